"""The training commands: `finetune` (one method on one task), `compare` (several methods,
a table and a plot) and `demo` (the embedded default comparison). Their shared run settings
are TrainConfig's fields, one flag each."""

from __future__ import annotations

import argparse
import time

from .common import quiet_transformers, set_threads

__all__ = [
    "add_compare", "add_demo", "add_finetune", "config_from", "run_compare", "run_demo",
    "run_finetune",
]


def _setup(args: argparse.Namespace) -> None:
    quiet_transformers()
    set_threads(args.threads)


def _add_train_arguments(parser: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    """The run settings finetune and compare share (dest names = TrainConfig fields)."""
    from ..train.config import TrainConfig

    base = {**TrainConfig.defaults(), **(defaults or {})}
    data = parser.add_argument_group("task and data")
    data.add_argument("--task", required="task" not in (defaults or {}),
                      default=(defaults or {}).get("task"),
                      help="built-in task (bbc-news, drug-review, fashion-mnist, wiki-lm, "
                      "arithmetic) or, with --data, a kind: classification, causal-lm, generation")
    data.add_argument("--model", metavar="DIR", help="local Hugging Face model directory, or "
                      "minilm, smollm2-135m, dinov2-small (default: the task's model; with "
                      "--data: minilm for classification, smollm2-135m for causal-lm and "
                      "generation)")
    data.add_argument("--data", metavar="FILE", help="CSV/JSONL file: text,label (classification),"
                      " prompt,completion (generation) or text (causal-lm)")
    data.add_argument("--trust-remote-code", action="store_true",
                      help="let --model run its own Python code (off: see SECURITY.md)")
    data.add_argument("--max-train", type=int, default=base["max_train"], metavar="N",
                      help="use the first N training rows (seeded shuffle)")
    data.add_argument("--max-eval", type=int, default=base["max_eval"], metavar="N",
                      help="use the first N validation and N test rows")
    data.add_argument("--max-length", type=int, default=base["max_length"], metavar="TOKENS",
                      help="inputs are cut to this many tokens (default: %(default)s)")
    data.add_argument("--image-size", type=int, default=base["image_size"], metavar="PIXELS",
                      help="image tasks: side of the resized input (default: %(default)s)")
    method = parser.add_argument_group("method")
    method.add_argument("--r", type=int, help="ntk: feature dimension (default: the map's own)")
    method.add_argument("--rank", type=int, help="ntk: low-rank Z (default: dense)")
    method.add_argument("--feature-map", default=base["feature_map"],
                        help="ntk: elu, favor, taylor or exp (default: the task kind's, "
                        "train.methods.NTK_DEFAULTS; the run prints it)")
    method.add_argument("--sink-tokens", type=_sink_tokens, default=base["sink_tokens"],
                        metavar="N", help="ntk: the first N positions of a sequence read only "
                        "the real keys, protecting a decoder's attention sink (default: "
                        "%(default)s = 1 for decoders, 0 for encoders and ViTs)")
    method.add_argument("--ntk-gated", action=argparse.BooleanOptionalAction,
                        default=base["ntk_gated"],
                        help="ntk: the state's Z = diag(kappa) U, values U and masses kappa "
                        "trained apart (default: the task kind's, train.methods.NTK_DEFAULTS)")
    method.add_argument("--ntk-init", choices=("zeros", "text"), default=base["ntk_init"],
                        help="ntk: the state starts at zero (the base model) or, for decoders, "
                        "as the exact cache of the first --r (default 64) training tokens "
                        "(default: the task kind's: text for decoders, zeros otherwise)")
    method.add_argument("--prefix-length", type=int, default=base["prefix_length"], metavar="M",
                        help="prefix/prompt: virtual tokens (default: %(default)s)")
    method.add_argument("--lora-r", type=int, default=base["lora_r"],
                        help="lora: rank (default: %(default)s)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, help="learning rate (default: the method's: ntk per "
                       "task kind (train.methods.NTK_DEFAULTS), lora 1e-2, prefix 1e-1, "
                       "prompt 3e-2, full 5e-5; the run prints it)")
    optim.add_argument("--head-lr", type=float, default=base["head_lr"],
                       help="learning rate of the task head (classifier) trained beside the "
                       "adapter (default: --lr; for image tasks at most 1e-3)")
    optim.add_argument("--epochs", type=int, default=base["epochs"],
                       help="passes over the training rows (default: %(default)s)")
    optim.add_argument("--max-steps", type=int, default=base["max_steps"],
                       help="stop after N optimizer steps (overrides --epochs)")
    optim.add_argument("--batch-size", type=int, default=base["batch_size"],
                       help="rows per optimizer step (default: %(default)s)")
    optim.add_argument("--warmup-ratio", type=float, default=base["warmup_ratio"],
                       help="share of the steps with a linear lr warm-up, then linear decay "
                       "(default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=base["weight_decay"],
                       help="AdamW weight decay (default: %(default)s)")
    optim.add_argument("--seed", type=int, default=base["seed"],
                       help="seed of the data order, splits and initialisation (default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--output", metavar="DIR", default=base["output"],
                     help="folder of the run (default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output from its latest checkpoint")
    run.add_argument("--save-every", type=int, default=base["save_every"], metavar="STEPS",
                     help="checkpoint every N steps, besides every epoch (0: epochs only; default: "
                     "%(default)s)")
    run.add_argument("--device", default=base["device"],
                     help="auto (cuda if available), cpu or cuda[:i] (default: %(default)s)")
    run.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--compile", action="store_true",
                     help="run the model through torch.compile (same results; the first steps "
                     "compile, later ones may run faster)")
    run.add_argument("--detect-nonfinite", action="store_true",
                     help="stop at the first NaN/inf activation, gradient or parameter and name "
                     "the layer (slower: checks every module output)")
    # Stops a run after N steps as a crash would (no final files): for crash/resume tests.
    run.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)


def _sink_tokens(text: str) -> int | str:
    """--sink-tokens: "auto" or an int >= 0 (else a usage error naming the flag)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 0, got {text!r}")
    return value


def config_from(args: argparse.Namespace, **fixed):
    from ..train.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values.update(fixed)
    return TrainConfig(**values)


def run_finetune(args: argparse.Namespace) -> int:
    from ..train.config import RunError
    from ..train.loop import train
    from ..train.run_folder import holds_run

    config = config_from(args)
    if args.resume and not holds_run(config.output):
        raise RunError(f"--resume: {config.output} holds no run to continue (no checkpoint, no "
                       "results.json); drop --resume to start one")
    _setup(args)
    results = train(config, resume=args.resume, progress=not args.no_progress,
                    stop_after_steps=args.stop_after_steps)
    if results is None:
        print(f"stopped after {args.stop_after_steps} steps; continue with --resume")
        return 0
    test = results["metrics"]["test"]
    print(f"{results['method']} on {results['task']}: test "
          + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
          + f"; {results['trainable_parameters']:,} trainable parameters; "
          f"results in {config.output}/results.json")
    return 0


def add_finetune(parser: argparse.ArgumentParser) -> None:
    from ..train.methods import METHODS

    parser.add_argument("--method", required=True, choices=sorted(METHODS),
                        help="ntk (NTK-Attention), lora, prefix (P-Tuning v2), prompt or full")
    _add_train_arguments(parser)


def run_compare(args: argparse.Namespace) -> int:
    from ..train.compare import compare

    _setup(args)
    config = config_from(args, method=args.methods[0])
    out = compare(config, args.methods, output=args.output, resume=args.resume,
                  progress=not args.no_progress, stop_after_steps=args.stop_after_steps)
    if out is None:
        print(f"stopped after {args.stop_after_steps} steps; continue with --resume")
        return 0
    print("\n" + out["table"])
    print(f"\ntable: {out['files']['comparison.md']}\nplot:  {out['files']['comparison.png']}")
    return 0


def add_compare(parser: argparse.ArgumentParser) -> None:
    from ..train.methods import METHODS

    parser.add_argument("--methods", nargs="+", default=["ntk", "lora", "prefix"],
                        choices=sorted(METHODS), metavar="METHOD",
                        help=f"methods to compare, from {sorted(METHODS)} (default: %(default)s)")
    _add_train_arguments(parser, defaults={"output": "runs/compare"})


def run_demo(args: argparse.Namespace) -> int:
    from ..train.compare import DEMO_METHODS, compare, demo_config, demo_note, prepare_demo_output

    _setup(args)
    started = time.perf_counter()
    config = demo_config(max_steps=args.max_steps, max_train=args.max_train,
                         max_eval=args.max_eval, epochs=args.epochs)
    methods = tuple(args.methods or DEMO_METHODS)
    print("NTK-Attention vs LoRA vs prefix tuning (P-Tuning v2): all-MiniLM-L6-v2 on BBC News "
          "(5 topics).")
    print(demo_note(config))
    output = prepare_demo_output(args.output)
    out = compare(config, methods, output=output, progress=not args.no_progress)
    print("\n" + out["table"])
    print(f"\ntable: {out['files']['comparison.md']}\nplot:  {out['files']['comparison.png']}")
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return 0


def add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", metavar="DIR",
                        help="folder of the comparison (default: %(default)s)")
    from ..train.methods import METHODS

    parser.add_argument("--methods", nargs="+", metavar="METHOD", choices=sorted(METHODS),
                        help=f"from {sorted(METHODS)} (default: ntk lora prefix)")
    parser.add_argument("--max-steps", type=int, help="cut each run short (smoke tests)")
    parser.add_argument("--max-train", type=int, metavar="N",
                        help="training rows (default: the demo's, printed when it starts)")
    parser.add_argument("--max-eval", type=int, metavar="N",
                        help="validation and test rows (default: the demo's)")
    parser.add_argument("--epochs", type=int, help="passes over the training rows (default: the "
                        "demo's)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
