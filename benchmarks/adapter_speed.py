"""End-to-end speed of the NTK-Attention adapter inside real models, side by side with PEFT.

Three measurements, each in one process, side by side:

    train     MiniLM (all-MiniLM-L6-v2, BERT, 6 layers) sequence classification, one training
              step = forward + cross-entropy + backward + AdamW step + zero_grad, batch 16,
              length 128, for
                  ntk        the NTK adapter, feature map "elu" (r = head dim)
                  lora       PEFT LoRA, r = 8, on query/value
                  prefix m   PEFT prefix tuning (P-Tuning v2 deep prefix), m in PREFIX_LENGTHS,
                             with the position patch of ``train.methods`` (real tokens keep
                             positions 0..L-1, so any m fits BERT's 512-position table)
    generate  SmolLM2-135M (Llama, GQA 9/3, 30 layers) cached greedy decoding: ``generate`` with
              the KV cache, 32 new tokens after a 64-token prompt, batch 1, for
                  base       the bare base model
                  ntk        the NTK adapter ("elu"), state made non-zero so its branch runs
                  prefix m   PEFT prefix tuning, m in PREFIX_LENGTHS
    steps     base and NTK SmolLM2 built as for ``generate``, single cached decoding steps
              (the NTK state read once, as inside ``generate``) alternated in pairs
              (``--step-pairs``, default 200): the decoding ratio with less noise than whole
              ``generate`` calls, whose rounds' ratios spread widely on a shared host

The NTK state (Z, kappa) has the same size whatever prefix length m it stands for, so its cost
does not depend on m: it is measured once. Every contender is a separate copy of the model, all
built through ``train.methods.build_method`` exactly as the fine-tuning CLI builds them.

Timing: every contender runs twice to warm up, then ``--rounds`` rounds in which each contender
is measured once, in an order rotated every round; ratios are computed per round (both
contenders measured under the same machine load) and the tables report medians over rounds.
This matters on the shared 2-core CPU this was written for, where absolute times drift with
other jobs. It runs with one torch thread by default: with two OpenMP threads on two cores that
other jobs also use, a thread waiting at a barrier for a descheduled partner made every op
hundreds of times slower (a [1, 9, 1, 64] x [1, 3, 100, 64] SDPA call took 8 ms with 2 threads,
17 us with 1), which measures the scheduler, not the adapter.

    python benchmarks/adapter_speed.py --output docs/results/adapter_speed_cpu
    python benchmarks/adapter_speed.py --quick                                   # m in {16}, 2 rounds

Results record the command, git commit, package versions, machine and its load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ntk_attention import provenance
from ntk_attention.models import minilm_path, smollm2_path
from ntk_attention.train.methods import MethodOptions, build_method


@dataclasses.dataclass(frozen=True)
class Config:
    prefix_lengths: tuple[int, ...] = (16, 256, 1024)
    rounds: int = 5
    warmup: int = 2
    train_batch: int = 16
    train_length: int = 128
    prompt_length: int = 64
    new_tokens: int = 32
    step_pairs: int = 200
    seed: int = 0


# ------------------------------------------------------------------------------ contenders


def _load_minilm_classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=4, attn_implementation="sdpa"
    )


def _load_smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), attn_implementation="sdpa").eval()


def train_steps(config: Config) -> dict[str, Callable[[], None]]:
    """name -> one training step of that method on a fixed random batch."""
    generator = torch.Generator().manual_seed(config.seed)
    input_ids = torch.randint(1000, 20000, (config.train_batch, config.train_length),
                              generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 4, (config.train_batch,), generator=generator)
    methods = {"ntk": ("ntk", 16), "lora": ("lora", 16)}
    methods.update({f"prefix{m}": ("prefix", m) for m in config.prefix_lengths})
    steps = {}
    for name, (method, m) in methods.items():
        torch.manual_seed(config.seed)
        options = MethodOptions(prefix_length=m, max_length=config.train_length, seed=config.seed)
        model = build_method(method, _load_minilm_classifier(), "classification", options)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step(model=model, optimizer=optimizer) -> None:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def _nonzero_ntk_state(model: torch.nn.Module, seed: int) -> None:
    """Give every (Z, kappa) a small positive value so the NTK branch really runs (at Z = 0,
    kappa = 0 it would still run, but a trained adapter is what is being timed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ntk_" in name:
                param.copy_(torch.rand(param.shape, generator=generator) * 0.01)


def generate_calls(config: Config) -> dict[str, Callable[[], None]]:
    """name -> one cached greedy ``generate`` of ``new_tokens`` tokens."""
    generator = torch.Generator().manual_seed(config.seed)
    input_ids = torch.randint(1000, 20000, (1, config.prompt_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    methods: dict[str, tuple[str | None, int]] = {"base": (None, 16), "ntk": ("ntk", 16)}
    methods.update({f"prefix{m}": ("prefix", m) for m in config.prefix_lengths})
    calls = {}
    for name, (method, m) in methods.items():
        torch.manual_seed(config.seed)
        model = _load_smollm2()
        if method is not None:
            options = MethodOptions(prefix_length=m, max_length=config.prompt_length
                                    + config.new_tokens, seed=config.seed)
            model = build_method(method, model, "causal-lm", options)
        if method == "ntk":
            _nonzero_ntk_state(model, config.seed)
        model.eval()

        def call(model=model) -> None:
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=0,
                )
            assert out.shape[1] == config.prompt_length + config.new_tokens

        calls[name] = call
    return calls


def decode_step_pairs(config: Config) -> list[float]:
    """NTK / base time of single cached decoding steps (one token after the prompt in the
    cache, cropped back after each step), alternating base and NTK ``step_pairs`` times with
    the order flipped every pair: one ratio per pair. A whole ``generate`` per round is a few
    seconds long and its rounds' ratios spread widely on a shared host; steps 80 ms apart see
    the same load."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(config.seed)
    input_ids = torch.randint(1000, 20000, (1, config.prompt_length), generator=generator)
    base = _load_smollm2().eval()
    options = MethodOptions(prefix_length=16, max_length=config.prompt_length + 1, seed=config.seed)
    ntk = build_method("ntk", _load_smollm2(), "causal-lm", options).eval()
    _nonzero_ntk_state(ntk, config.seed)

    def stepper(model: torch.nn.Module) -> Callable[[], None]:
        cache = DynamicCache(config=base.config)
        with torch.no_grad():
            model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        token, position = input_ids[:, -1:], torch.tensor([[config.prompt_length]])

        def step() -> None:
            with torch.no_grad():
                model(input_ids=token, past_key_values=cache, use_cache=True, position_ids=position)
            cache.crop(-1)

        return step

    with ntk._decoding():  # as inside generate(): each layer's state read once
        steps = {"base": stepper(base), "ntk": stepper(ntk)}
        for step in steps.values():
            for _ in range(config.warmup + 3):
                step()
        ratios = []
        for i in range(config.step_pairs):
            seconds = {}
            for name in ("base", "ntk") if i % 2 else ("ntk", "base"):
                start = time.perf_counter()
                steps[name]()
                seconds[name] = time.perf_counter() - start
            ratios.append(seconds["ntk"] / seconds["base"])
    return ratios


# ------------------------------------------------------------------------------ timing


def time_interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """``warmup`` untimed calls each, then ``rounds`` rounds of one timed call each, order
    rotated."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds}: "
              + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), file=sys.stderr)
    return times


def round_ratio(times: dict[str, list[float]], top: str, bottom: str) -> float:
    """Median over rounds of top/bottom measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))


# ------------------------------------------------------------------------------ report


def markdown(config: Config, train: dict, gen: dict, step_ratios: list[float]) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.0f}"

    med = {k: statistics.median(v) for k, v in train.items()}
    lines = [
        (f"Times in ms, median of {config.rounds} interleaved rounds; a ratio is the median over "
         "rounds of the two contenders' times in the same round. NTK's state has the same size "
         "whatever prefix length m it stands for, so NTK is measured once and compared with "
         "every m."),
        "",
        (f"**Training step**, MiniLM (BERT, 6 layers) classification, batch "
         f"{config.train_batch}, length {config.train_length}, forward + backward + AdamW:"),
        "",
        "| contender | step ms | / LoRA |",
        "|---|---|---|",
    ]
    for name in train:
        lines.append(f"| {name} | {ms(med[name])} | {round_ratio(train, name, 'lora'):.2f}x |")
    gmed = {k: statistics.median(v) for k, v in gen.items()}
    per_token = 1 / config.new_tokens
    lines += [
        "",
        (f"**Cached greedy decoding**, SmolLM2-135M (Llama, GQA 9/3, 30 layers), batch 1, "
         f"{config.prompt_length}-token prompt, {config.new_tokens} new tokens (the whole "
         "`generate` call, prompt included; per token = call / new tokens):"),
        "",
        "| contender | generate ms | per token ms | / base |",
        "|---|---|---|---|",
    ]
    for name in gen:
        lines.append(f"| {name} | {ms(gmed[name])} | {gmed[name] * per_token * 1e3:.1f} | "
                     f"{round_ratio(gen, name, 'base'):.2f}x |")
    ntk_lora = round_ratio(train, "ntk", "lora")
    ntk_base = round_ratio(gen, "ntk", "base")
    quartiles = statistics.quantiles(step_ratios, n=4)
    lines += [
        "",
        (f"**Single decoding steps**, paired (one token with the {config.prompt_length}-token "
         f"prompt cached; base and NTK alternating, {len(step_ratios)} pairs): NTK / base "
         f"median {statistics.median(step_ratios):.3f}x, quartiles {quartiles[0]:.3f}x - "
         f"{quartiles[2]:.3f}x."),
        "",
        "Targets:",
        f"- NTK training step <= 1.1x LoRA: {ntk_lora:.2f}x ({'met' if ntk_lora <= 1.1 else 'NOT met'})",
        f"- NTK decoding <= 1.1x base: {ntk_base:.2f}x ({'met' if ntk_base <= 1.1 else 'NOT met'})",
        f"- NTK decoding step <= 1.1x base, paired: {statistics.median(step_ratios):.3f}x "
        f"({'met' if statistics.median(step_ratios) <= 1.1 else 'NOT met'})",
    ]
    return "\n".join(lines) + "\n"


def _decoding_merge() -> str:
    """Which merge NTK's decoding steps ran: the numba-compiled one or the torch ops."""
    from ntk_attention.ops import decode_merge

    if not decode_merge.available():
        return "torch ops (numba not available)"
    import numba

    return f"compiled (numba {numba.__version__})"


def environment() -> dict:
    """The provenance record (``ntk_attention.provenance``) and which decoding merge ran."""
    return {**provenance.environment(), "decoding_merge": _decoding_merge()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="m in {16}, 2 rounds")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: see the module docstring)")
    parser.add_argument("--warmup", type=int, help="untimed calls per contender (default 2)")
    parser.add_argument("--step-pairs", type=int, help="paired single decoding steps (default 200)")
    parser.add_argument("--prefix-lengths", type=int, nargs="+", help="prefix lengths m")
    parser.add_argument("--output", type=Path,
                        help="write OUTPUT.md and OUTPUT.json, e.g. docs/results/adapter_speed_cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = Config()
    if args.quick:
        config = dataclasses.replace(config, prefix_lengths=(16,), rounds=2, step_pairs=10)
    if args.rounds:
        config = dataclasses.replace(config, rounds=args.rounds)
    if args.warmup is not None:
        config = dataclasses.replace(config, warmup=args.warmup)
    if args.prefix_lengths:
        config = dataclasses.replace(config, prefix_lengths=tuple(args.prefix_lengths))
    if args.step_pairs:
        config = dataclasses.replace(config, step_pairs=args.step_pairs)
    print(f"config: {config}", file=sys.stderr)
    load_before = os.getloadavg()

    print("training steps (MiniLM):", file=sys.stderr)
    train = time_interleaved(train_steps(config), config.rounds, config.warmup)
    print("cached generation (SmolLM2-135M):", file=sys.stderr)
    gen = time_interleaved(generate_calls(config), config.rounds, config.warmup)
    print(f"paired decoding steps ({config.step_pairs}):", file=sys.stderr)
    step_ratios = decode_step_pairs(config)

    table = markdown(config, train, gen, step_ratios)
    print(table)
    if args.output:
        env = environment()
        env["hardware"]["load_average_before"] = list(load_before)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Adapter speed (cpu)\n\n{provenance.summary_line(env)} NTK decoding merge "
            f"{env['decoding_merge']}. The cores are shared with other jobs: 1-min load average "
            f"{load_before[0]:.1f} before, {env['hardware']['load_average'][0]:.1f} after.\n\n"
        )
        args.output.with_suffix(".md").write_text(header + table)
        record = {**env, "config": dataclasses.asdict(config),
                  "train_s": train, "generate_s": gen, "decode_step_ratios": step_ratios,
                  "table": table}
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
