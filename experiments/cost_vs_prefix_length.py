"""Cost of prefix tuning as its prefix grows, against NTK-Attention, whose state has one size
whatever prefix length m it stands for (issue 6).

For m in {1, 16, 64, 256, 1024, 4096} PEFT prefix tuning (P-Tuning v2 deep prefix, built by
``train.methods`` exactly as the fine-tuning CLI builds it) is measured beside the NTK adapter
("elu" features, r = head dim) and a reference (LoRA r = 8 for training, the bare model for
inference) on two real models:

    smollm2   SmolLM2-135M (Llama, GQA 9/3), the first ``--smollm2-layers`` of its 30 layers
              (default 8, to keep the run to minutes on 2 shared cores); causal-LM training
              step (batch 4, length 128, labels = inputs) and cached greedy decoding (per new
              token, batch 1, 64-token prompt)
    minilm    all-MiniLM-L6-v2 (BERT, 6 layers); classification training step (batch 4,
              length 128) and, as an encoder cannot generate, the latency of one inference
              forward of one 128-token sequence

Metrics per contender:
    train_s        forward + loss + backward + AdamW step + zero_grad (seconds)
    infer_s        smollm2: seconds per new token of ``generate`` with the KV cache, taken as
                   (generate(1 + n tokens) - generate(1 token)) / n so the prompt's prefill
                   (which also grows with m) is left out; minilm: one no-grad forward
    train_peak     peak RSS growth during one training step after a warm-up step (activations,
                   gradients; the optimizer state already exists), fresh subprocess per
                   contender, VmHWM reset through /proc/self/clear_refs, glibc told to map
                   every allocation >= 64 KiB separately (MALLOC_MMAP_THRESHOLD_) so freed
                   memory leaves RSS and the peak is that of live memory
    infer_peak     the same around one ``generate`` (smollm2) or forward (minilm)
    state          trainable parameters of the adapter (prefix: layers x m x 2 x kv dim; NTK:
                   layers x KV heads x (r x D + r)) and, for decoding, the KV-cache entries the
                   prefix adds (prefix tuning pushes its m keys/values into every cache)

Timing: one process per model; every contender is warmed up, then ``--rounds`` rounds (9 for
the shorter, noisier inference calls) measure each contender once in an order rotated every round. Ratios to NTK are medians of per-round
ratios (measured under the same load); absolute times drift with other jobs on the machine.
Torch runs one thread (see benchmarks/adapter_speed.py for why).

    python experiments/cost_vs_prefix_length.py --output docs/results/cost_vs_prefix_length
    python experiments/cost_vs_prefix_length.py --quick          # m in {1, 64}, 1 round
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ntk_attention.models import minilm_path, smollm2_path
from ntk_attention.provenance import environment, summary_line
from ntk_attention.train.methods import MethodOptions, build_method, count_parameters
from ntk_attention.train.peak_memory import peak_rss_growth

MODELS = ("smollm2", "minilm")


@dataclasses.dataclass(frozen=True)
class Config:
    prefix_lengths: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
    rounds: int = 3  # training steps
    infer_rounds: int = 9  # inference calls are short and noisier: more rounds
    smollm2_layers: int = 8
    train_batch: int = 4
    train_length: int = 128
    prompt_length: int = 64
    new_tokens: int = 16
    seed: int = 0
    memory: bool = True


# ------------------------------------------------------------------------------ contenders


def contenders(config: Config) -> list[str]:
    """ntk, the reference (lora for training, base for inference) and prefix<m> for every m."""
    return ["ntk", "lora", "base"] + [f"prefix{m}" for m in config.prefix_lengths]


def _method(name: str) -> tuple[str | None, int]:
    if name.startswith("prefix"):
        return "prefix", int(name.removeprefix("prefix"))
    return (None if name == "base" else name), 16


def build(model_name: str, name: str, config: Config) -> torch.nn.Module:
    """The model of ``model_name`` with contender ``name`` applied (train mode)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(config.seed)
    if model_name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_path(), attn_implementation="sdpa", num_hidden_layers=config.smollm2_layers
        )
        kind = "causal-lm"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=4, attn_implementation="sdpa"
        )
        kind = "classification"
    method, m = _method(name)
    if method is None:  # the bare model is only run for inference
        model.requires_grad_(False)
    else:
        max_length = config.train_length + (config.new_tokens + 1 if model_name == "smollm2" else 0)
        options = MethodOptions(prefix_length=m, max_length=max_length, seed=config.seed)
        model = build_method(method, model, kind, options)
    if method == "ntk":  # a trained-looking state, so the state's branch does real work
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "ntk_" in param_name:
                    param.copy_(torch.rand(param.shape, generator=generator) * 0.01)
    return model.train()


def batches(model_name: str, config: Config) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(1000, 20000, (config.train_batch, config.train_length), generator=generator)
    train = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_name == "smollm2":
        train["labels"] = ids
        prompt = ids[:1, : config.prompt_length]
    else:
        train["labels"] = torch.randint(0, 4, (config.train_batch,), generator=generator)
        prompt = ids[:1]
    return {"train": train, "infer": {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}}


class Runner:
    """The timed calls of one contender on one model."""

    def __init__(self, model_name: str, name: str, config: Config):
        self.model_name, self.name, self.config = model_name, name, config
        self.model = build(model_name, name, config)
        self.data = batches(model_name, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None
        self.trainable = count_parameters(self.model)[0]

    def train_step(self) -> None:
        out = self.model(**self.data["train"])
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, new_tokens: int) -> None:
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(
                **self.data["infer"], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, pad_token_id=0,
            )
        self.model.train()
        assert out.shape[1] == self.config.prompt_length + new_tokens

    def infer(self) -> None:
        if self.model_name == "smollm2":
            self.generate(1 + self.config.new_tokens)
            return
        self.model.eval()
        with torch.no_grad():
            self.model(**self.data["infer"])
        self.model.train()


# ------------------------------------------------------------------------------ timing


def time_interleaved(
    calls: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """One warm-up call each, then ``rounds`` rounds of one call each, order rotated; each call
    returns its own measurement in seconds."""
    for call in calls.values():
        call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(calls[name]())
        print(f"    round {r + 1}/{rounds}: "
              + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), file=sys.stderr)
    return times


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_times(model_name: str, config: Config) -> dict:
    names = contenders(config)
    runners = {name: Runner(model_name, name, config) for name in names}
    train_names = [n for n in names if n != "base"]
    print(f"  {model_name}: training steps", file=sys.stderr)
    train = time_interleaved(
        {n: (lambda r=runners[n]: _timed(r.train_step)) for n in train_names}, config.rounds
    )
    infer_names = [n for n in names if n != "lora"]
    print(f"  {model_name}: inference", file=sys.stderr)
    if model_name == "smollm2":
        n = config.new_tokens

        def per_token(runner: Runner) -> float:
            return (_timed(lambda: runner.generate(1 + n)) - _timed(lambda: runner.generate(1))) / n

        infer = time_interleaved({k: (lambda r=runners[k]: per_token(r)) for k in infer_names},
                                 config.infer_rounds)
    else:
        infer = time_interleaved(
            {k: (lambda r=runners[k]: _timed(r.infer)) for k in infer_names}, config.infer_rounds
        )
    trainable = {name: runner.trainable for name, runner in runners.items()}
    return {"train_s": train, "infer_s": infer, "trainable": trainable}


# ------------------------------------------------------------------------------ memory


def memory_child(model_name: str, name: str, config: Config) -> dict:
    torch.set_num_threads(1)
    runner = Runner(model_name, name, config)
    out = {}
    if name != "base":
        runner.train_step()  # warm-up: the optimizer state exists before the measured step
        out["train_peak"] = peak_rss_growth(runner.train_step)
    if name != "lora":
        runner.infer()
        out["infer_peak"] = peak_rss_growth(runner.infer)
    return out


def measure_memory(model_name: str, config: Config) -> dict[str, dict]:
    results = {}
    for name in contenders(config):
        command = [sys.executable, __file__, "--memory-child", model_name, name,
                   "--config-json", json.dumps(dataclasses.asdict(config))]
        # Every allocation of 64 KiB or more is its own mapping, returned on free, so RSS
        # follows live memory (otherwise the warm-up step's freed heap is reused unseen).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        output = subprocess.run(command, check=True, capture_output=True, text=True,
                                env=env).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        print(f"  {model_name} memory {name}: "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in results[name].items()),
              file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------------------ report


def round_ratio(times: dict[str, list[float]], top: str, bottom: str) -> float:
    return statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))


def kv_cache_entries(model_name: str, name: str, config: Config) -> int:
    """Extra KV-cache floats the prefix adds at decoding (0 for NTK, LoRA, base)."""
    method, m = _method(name)
    if method != "prefix":
        return 0
    if model_name == "smollm2":
        layers, kv_dim = config.smollm2_layers, 3 * 64
    else:
        layers, kv_dim = 6, 384
    return layers * m * 2 * kv_dim


def table(model_name: str, config: Config, result: dict) -> str:
    train, infer = result["train_s"], result["infer_s"]
    memory = result.get("memory") or {}
    infer_label = "decode ms/token" if model_name == "smollm2" else "inference forward ms"

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"

    def mib(name: str, key: str) -> str:
        value = memory.get(name, {}).get(key)
        return "-" if value is None else f"{value / 2**20:.0f}"

    lines = [
        f"| contender | trainable params | extra KV floats | train step ms | / NTK | train peak MiB "
        f"| {infer_label} | / NTK | inference peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in contenders(config):
        t = f"{ms(statistics.median(train[name]))} | {round_ratio(train, name, 'ntk'):.2f}x" \
            if name in train else "- | -"
        i = f"{ms(statistics.median(infer[name]))} | {round_ratio(infer, name, 'ntk'):.2f}x" \
            if name in infer else "- | -"
        lines.append(
            f"| {name} | {result['trainable'][name]:,} | "
            f"{kv_cache_entries(model_name, name, config):,} | {t} | {mib(name, 'train_peak')} | "
            f"{i} | {mib(name, 'infer_peak')} |"
        )
    return "\n".join(lines)


def plot(config: Config, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms_ = config.prefix_lengths
    columns = [("train_s", "training step (s)"), ("infer_s", None),
               ("train_peak", "training step peak RSS growth (MiB)"),
               ("infer_peak", "inference peak RSS growth (MiB)")]
    fig, axes = plt.subplots(len(results), len(columns), figsize=(4.2 * len(columns),
                                                                    3.4 * len(results)))
    for row, (model_name, result) in enumerate(results.items()):
        for col, (key, label) in enumerate(columns):
            ax = axes[row][col]
            if label is None:
                label = ("decode latency (s / token)" if model_name == "smollm2"
                         else "inference forward (s)")
            if key.endswith("_s"):
                values = {n: statistics.median(v) for n, v in result[key].items()}
            else:
                values = {n: v[key] / 2**20 for n, v in (result.get("memory") or {}).items()
                          if key in v}
            if not values:
                ax.set_visible(False)
                continue
            prefix = [values.get(f"prefix{m}") for m in ms_]
            ax.plot(ms_, prefix, "o-", label="prefix tuning (m virtual tokens)")
            if "ntk" in values:
                ax.axhline(values["ntk"], color="C1", linestyle="--",
                           label="NTK-Attention (any m)")
            reference = "lora" if key.startswith("train") else "base"
            if reference in values:
                ax.axhline(values[reference], color="C2", linestyle=":",
                           label="LoRA r=8" if reference == "lora" else "base model")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prefix length m")
            ax.set_title(f"{model_name}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="m in {1, 64}, 1 round, no memory")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--prefix-lengths", type=int, nargs="+")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--smollm2-layers", type=int)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--output", type=Path,
                        help="write OUTPUT.{json,md,png}, e.g. docs/results/cost_vs_prefix_length")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.memory_child:
        config = Config(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in json.loads(args.config_json).items()})
        print(json.dumps(memory_child(*args.memory_child, config)))
        return
    torch.set_num_threads(1)
    config = Config()
    if args.quick:
        config = dataclasses.replace(config, prefix_lengths=(1, 64), rounds=1, infer_rounds=1,
                                     memory=False)
    overrides = {"prefix_lengths": tuple(args.prefix_lengths) if args.prefix_lengths else None,
                 "rounds": args.rounds, "smollm2_layers": args.smollm2_layers,
                 "memory": False if args.no_memory else None}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    print(f"config: {config}", file=sys.stderr)
    load_before = os.getloadavg()
    started = time.perf_counter()

    results = {}
    for model_name in args.models:
        results[model_name] = measure_times(model_name, config)
        if config.memory:
            results[model_name]["memory"] = measure_memory(model_name, config)
    minutes = (time.perf_counter() - started) / 60

    sections = []
    for model_name, result in results.items():
        title = (f"SmolLM2-135M, first {config.smollm2_layers} of 30 layers (GQA 9/3)"
                 if model_name == "smollm2" else "MiniLM-L6 (BERT, 6 layers)")
        sections.append(f"**{title}**: training step batch {config.train_batch} x length "
                        f"{config.train_length}; "
                        + (f"decoding per new token after a {config.prompt_length}-token prompt "
                           f"(batch 1, {config.new_tokens} tokens, prefill subtracted)"
                           if model_name == "smollm2" else
                           f"one inference forward of 1 x {config.train_length} tokens")
                        + ".\n\n" + table(model_name, config, result))
    body = "\n\n".join(sections) + "\n"
    print(body)
    if args.output:
        env = environment()
        env["hardware"]["load_average_before"] = list(load_before)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        plot(config, results, args.output.with_suffix(".png"))
        header = (
            f"# Cost vs prefix length (cpu)\n\n{summary_line(env)} The cores are shared with "
            f"other jobs: 1-min load average {load_before[0]:.1f} before, "
            f"{env['hardware']['load_average'][0]:.1f} after; {minutes:.1f} min.\n\n"
            f"Times are medians of {config.rounds} (training) and {config.infer_rounds} "
            "(inference) interleaved rounds; a ratio is the median "
            "over rounds of the two contenders' times in the same round. NTK-Attention's state "
            "has the same size for every m, so it is one row (and one flat line in the plot); "
            "the reference rows are LoRA r=8 (training) and the bare model (inference). Peak "
            "memory is RSS growth in a fresh process (see the script's docstring).\n\n"
            f"![cost vs prefix length]({args.output.with_suffix('.png').name})\n\n"
        )
        args.output.with_suffix(".md").write_text(header + body)
        record = {**env, "config": dataclasses.asdict(config), "results": results,
                  "minutes": minutes, "table": body}
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output.with_suffix('.md')}, .json and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
