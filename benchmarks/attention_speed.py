"""Speed and peak memory of NTK-Attention's lse and fused paths, side by side with plain SDPA, their
twin and exact prefix attention.

For B=4, H=8, D=64, causal, L in {512, 1024, 2048} it measures forward (under no_grad) and
forward+backward (gradients for q, k, v and the state or prefix) of

    sdpa      torch SDPA, no state: the floor NTK-Attention is compared to
    lse       ntk_attention(..., implementation="lse"): the kernel's log-sum-exp merged with the
              state in closed form (the default, "auto", on CPU; on CUDA it hands over to fused)
    fused     ntk_attention(..., implementation="fused"), feature map "elu" (r = D): the state
              as one extra key/value column of SDPA
    naive     ntk_attention(..., implementation="naive"): the twin that materialises scores
    prefix m  prefix_attention with m in {64, 256, 1024, 4096} trainable prefix keys/values

and the peak memory of one forward at L = 8192 for lse and fused vs SDPA.

Timing: every contender runs twice to warm up, then ``--rounds`` rounds in which each contender
is measured once, in an order rotated every round, so that ratios are measured side by side
under the same machine load; the table reports medians over rounds. On CUDA one measurement
averages enough back-to-back calls to last >= 50 ms (synchronised before and after). Memory on CPU: each contender runs in
a fresh subprocess that builds its inputs, resets the kernel's peak-RSS counter (VmHWM, via
/proc/self/clear_refs) and reports peak RSS minus the RSS before the call, i.e. every page the
call touched (output included); on CUDA: torch.cuda.max_memory_allocated minus the memory
allocated before the call. Naive is left out of the memory run (its scores alone take
B*H*L^2*4 bytes, 8.6 GB at L = 8192).

    python benchmarks/attention_speed.py                      # the full table (minutes)
    python benchmarks/attention_speed.py --quick              # small sizes, seconds
    python benchmarks/attention_speed.py --device cuda --output docs/results/attention_speed_cuda

Results record the command, git commit (``NTK_GIT_COMMIT`` where the tree has no history),
package versions and machine (``ntk_attention.provenance``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ntk_attention import provenance
from ntk_attention.ops import ntk_attention, prefix_attention
from ntk_attention.train.peak_memory import peak_rss_growth

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 4
    heads: int = 8
    head_dim: int = 64
    lengths: tuple[int, ...] = (512, 1024, 2048)
    prefix_lengths: tuple[int, ...] = (64, 256, 1024, 4096)
    memory_length: int = 8192
    rounds: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    naive: bool = True


def make_inputs(config: Config, length: int, prefix_len: int = 0, grad: bool = False) -> dict:
    """q, k, v [B, H, L, D], an elu state (Z [H, D, D], kappa [H, D]) and a prefix [H, m, D]."""
    generator = torch.Generator().manual_seed(0)
    dtype, device = DTYPES[config.dtype], torch.device(config.device)

    def randn(*shape, std=1.0):
        t = torch.randn(*shape, generator=generator) * std
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    b, h, d = config.batch, config.heads, config.head_dim
    return {
        "q": randn(b, h, length, d),
        "k": randn(b, h, length, d),
        "v": randn(b, h, length, d),
        "z": randn(h, d, d, std=0.1),
        "kappa": randn(h, d).detach().abs().requires_grad_(grad),
        "prefix_k": randn(h, max(prefix_len, 1), d),
        "prefix_v": randn(h, max(prefix_len, 1), d),
    }


def contender(name: str) -> Callable[[dict], torch.Tensor]:
    """The attention call named ``name`` ("sdpa", "lse", "fused", "naive", "prefix")."""
    if name == "sdpa":
        return lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)
    if name in ("lse", "fused", "naive"):
        return lambda t: ntk_attention(
            t["q"], t["k"], t["v"], t["z"], t["kappa"], feature_map="elu", is_causal=True,
            implementation=name,
        )
    if name == "prefix":
        return lambda t: prefix_attention(
            t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], is_causal=True
        )
    raise ValueError(f"unknown contender {name!r}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """Timed calls of one contender in one mode ("fwd" or "fwd+bwd"). ``repeat`` calls make
    one measurement (set on CUDA so that launch overheads do not dominate short kernels)."""

    repeat = 1

    def __init__(self, config: Config, name: str, length: int, mode: str, prefix_len: int = 0):
        self.config, self.mode = config, mode
        self.fn = contender(name)
        self.inputs = make_inputs(config, length, prefix_len, grad=mode == "fwd+bwd")
        used = {"sdpa": ("q", "k", "v"), "prefix": ("q", "k", "v", "prefix_k", "prefix_v")}
        self.leaves = [self.inputs[n] for n in used.get(name, ("q", "k", "v", "z", "kappa"))]
        self.grad_out = torch.randn_like(self.inputs["q"]).detach() if mode != "fwd" else None

    def __call__(self) -> float:
        """Seconds per call, averaged over ``repeat`` calls."""
        synchronize(self.config.device)
        start = time.perf_counter()
        for _ in range(self.repeat):
            for leaf in self.leaves:
                leaf.grad = None
            if self.mode == "fwd":
                with torch.no_grad():
                    self.fn(self.inputs)
            else:
                self.fn(self.inputs).backward(self.grad_out)
        synchronize(self.config.device)
        return (time.perf_counter() - start) / self.repeat


def time_interleaved(
    runners: dict[str, Runner], rounds: int, min_measurement_s: float
) -> dict[str, list[float]]:
    """Warm every runner up, then ``rounds`` rounds of one measurement each, order rotated."""
    for runner in runners.values():
        runner()
        seconds = runner()
        runner.repeat = max(1, math.ceil(min_measurement_s / seconds))
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runners[name]())
    return times


def measure_speed(config: Config) -> list[dict]:
    rows = []
    for length in config.lengths:
        for mode in ("fwd", "fwd+bwd"):
            runners = {name: Runner(config, name, length, mode)
                       for name in ("sdpa", "lse", "fused") + (("naive",) if config.naive else ())}
            for m in config.prefix_lengths:
                runners[f"prefix{m}"] = Runner(config, "prefix", length, mode, prefix_len=m)
            min_measurement_s = 0.05 if config.device == "cuda" else 0.0
            times = time_interleaved(runners, config.rounds, min_measurement_s)
            del runners
            medians = {name: statistics.median(values) for name, values in times.items()}
            rows.append({"length": length, "mode": mode, "median_s": medians, "times_s": times})
            summary = ", ".join(f"{name} {value * 1e3:.3g} ms" for name, value in medians.items())
            print(f"L={length} {mode}: {summary}", file=sys.stderr, flush=True)
    return rows


def memory_child(config: Config, name: str) -> dict:
    """Peak memory of one forward of ``name`` at config.memory_length, in this process."""
    inputs = make_inputs(config, config.memory_length)
    fn = contender(name)
    with torch.no_grad():
        if config.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn(inputs)
            torch.cuda.synchronize()
            return {"peak_bytes": torch.cuda.max_memory_allocated() - before,
                    "method": "torch.cuda.max_memory_allocated - memory_allocated before"}
        return {"peak_bytes": peak_rss_growth(lambda: fn(inputs)),
                "method": "peak RSS (VmHWM after /proc/self/clear_refs) - RSS before, "
                          "fresh subprocess"}


def measure_memory(config: Config) -> dict:
    element = torch.empty((), dtype=DTYPES[config.dtype]).element_size()
    results: dict = {"tensor_bytes": config.batch * config.heads * config.memory_length
                     * config.head_dim * element}
    for name in ("sdpa", "lse", "fused"):
        command = [sys.executable, __file__, "--memory-child", name,
                   "--config-json", json.dumps(dataclasses.asdict(config))]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        print(f"memory L={config.memory_length} {name}: "
              f"{results[name]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return results


def round_ratio(row: dict, top: str, bottom: str) -> float:
    """Median over rounds of time(top) / time(bottom) measured in the same round."""
    pairs = zip(row["times_s"][top], row["times_s"][bottom], strict=True)
    return statistics.median(t / b for t, b in pairs)


def ratio(rows: list[dict], length: int, mode: str, top: str, bottom: str) -> float:
    row = next(r for r in rows if r["length"] == length and r["mode"] == mode)
    return round_ratio(row, top, bottom)


def markdown(config: Config, rows: list[dict], memory: dict | None) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"

    lines = [
        (f"B={config.batch}, H={config.heads}, D={config.head_dim}, causal, {config.dtype} on "
         f"{config.device}; times in ms, median of {config.rounds} interleaved rounds; a ratio "
         "is the median over rounds of the two contenders' times in the same round."),
        "",
        ("| L | mode | SDPA | lse | fused | naive | lse / SDPA | fused / SDPA | naive / lse "
         "| naive / fused |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        med = row["median_s"]
        naive = med.get("naive")
        naive_ms = ms(naive) if naive else "-"
        naive_ratios = [f"{round_ratio(row, 'naive', path):.2f}x" if naive else "-"
                        for path in ("lse", "fused")]
        lines.append(
            f"| {row['length']} | {row['mode']} | {ms(med['sdpa'])} | {ms(med['lse'])} | "
            f"{ms(med['fused'])} | {naive_ms} | {round_ratio(row, 'lse', 'sdpa'):.2f}x | "
            f"{round_ratio(row, 'fused', 'sdpa'):.2f}x | {' | '.join(naive_ratios)} |"
        )
    if config.prefix_lengths:
        lines += ["", ("Exact prefix attention with m prefix keys, against the NTK state on its lse path "
                       "(whose cost does not depend on m):"), "",
                  "| L | mode | " + " | ".join(f"m={m}" for m in config.prefix_lengths)
                  + " | " + " | ".join(f"m={m} / lse" for m in config.prefix_lengths) + " |",
                  "|---|---|" + "---|" * (2 * len(config.prefix_lengths))]
        for row in rows:
            med = row["median_s"]
            times = [med[f"prefix{m}"] for m in config.prefix_lengths]
            ratios = [round_ratio(row, f"prefix{m}", "lse") for m in config.prefix_lengths]
            lines.append(
                f"| {row['length']} | {row['mode']} | " + " | ".join(ms(t) for t in times)
                + " | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |"
            )
    if memory:
        sdpa = memory["sdpa"]["peak_bytes"]
        lines += ["", (f"Peak memory of one forward at L={config.memory_length} "
                       f"({memory['sdpa']['method']}); one [B, H, L, D] tensor is "
                       f"{memory['tensor_bytes'] / 2**20:.0f} MiB:"), "",
                  "| path | peak | / SDPA | - SDPA |", "|---|---|---|---|"]
        for name in ("sdpa", "lse", "fused"):
            peak = memory[name]["peak_bytes"]
            lines.append(f"| {name} | {peak / 2**20:.0f} MiB | {peak / sdpa:.2f}x | "
                         f"{(peak - sdpa) / 2**20:.0f} MiB |")
        naive_scores = config.batch * config.heads * config.memory_length**2 * 4
        lines.append(f"\n(naive not run: its fp32 scores alone would take "
                     f"{naive_scores / 2**30:.1f} GiB.)")
    target = 2048 if 2048 in config.lengths else max(config.lengths)
    lines += ["", f"Targets at L={target} (lse is the default path on CPU):"]
    for path in ("lse", "fused"):
        over_sdpa = ratio(rows, target, "fwd+bwd", path, "sdpa")
        lines.append(f"- {path} <= 1.3x SDPA forward+backward: {over_sdpa:.2f}x "
                     f"({'met' if over_sdpa <= 1.3 else 'NOT met'})")
    if config.naive:
        for path in ("lse", "fused"):
            speedup = ratio(rows, target, "fwd+bwd", "naive", path)
            speedup_fwd = ratio(rows, target, "fwd", "naive", path)
            lines.append(f"- {path} >= 4x faster than naive: forward+backward {speedup:.2f}x, "
                         f"forward {speedup_fwd:.2f}x "
                         f"({'met' if min(speedup, speedup_fwd) >= 4 else 'NOT met'})")
    return "\n".join(lines) + "\n"


def environment(config: Config) -> dict:
    """The provenance record (``ntk_attention.provenance``); its ``hardware.cuda`` (the GPU's
    name) only when the benchmark ran on it, with the CUDA version beside it."""
    env = provenance.environment()
    on_gpu = config.device == "cuda"
    env["hardware"]["cuda"] = env["hardware"]["cuda"] if on_gpu else None
    env["hardware"]["cuda_version"] = torch.version.cuda if on_gpu else None
    return env


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="L in {256, 512}, m in {64, 256}, memory at L=2048, 3 rounds")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths L")
    parser.add_argument("--prefix-lengths", type=int, nargs="*", help="prefix lengths m")
    parser.add_argument("--memory-length", type=int, help="L of the memory run (0: skip)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive path")
    parser.add_argument("--output", type=Path,
                        help="write OUTPUT.md and OUTPUT.json, e.g. docs/results/attention_speed_cpu")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.memory_child:
        config = Config(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in json.loads(args.config_json).items()})
        print(json.dumps(memory_child(config, args.memory_child)))
        return

    config = Config(device=args.device,
                    dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
                    naive=not args.no_naive)
    if args.quick:
        config = dataclasses.replace(config, lengths=(256, 512), prefix_lengths=(64, 256),
                                     memory_length=2048, rounds=3)
    overrides = {"lengths": tuple(args.lengths) if args.lengths else None,
                 "prefix_lengths": (tuple(args.prefix_lengths)
                                    if args.prefix_lengths is not None else None),
                 "memory_length": args.memory_length, "rounds": args.rounds}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    print(f"config: {config}", file=sys.stderr)

    rows = measure_speed(config)
    memory = measure_memory(config) if config.memory_length else None
    table = markdown(config, rows, memory)
    print(table)
    if args.output:
        env = environment(config)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Attention speed ({config.device})\n\n{provenance.summary_line(env)}\n\n"
        args.output.with_suffix(".md").write_text(header + table)
        record = {**env, "config": dataclasses.asdict(config), "speed": rows,
                  "memory": memory, "table": table}
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
