"""`ntk-attention ops-demo`: a long prefix replaced by a constant-size state, in numbers.

For prefixes of growing length m it prints the error of NTK-Attention with a closed-form
state (FAVOR+ and Taylor features) against exact prefix attention, and the time of both.
The data are synthetic with small logits (std ~0.25), where closed-form states are accurate;
on a real model's keys they are not, and the state must be trained (docs/results/REPORT.md section 5,
``ntk_attention.compress_prompt``).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from ..ops import get_feature_map, ntk_attention, prefix_attention, prefix_to_state
from .common import positive_int

__all__ = ["add_ops_demo", "format_ops_demo", "run_ops_demo", "run_ops_demo_command"]


def _best_time(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_ops_demo(
    prefix_lengths: tuple[int, ...] = (256, 4096, 65536),
    batch: int = 2,
    heads: int = 4,
    length: int = 512,
    head_dim: int = 32,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Measure error and time of closed-form NTK states vs exact prefix attention."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.5) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    q, k = randn(batch, heads, length, head_dim), randn(batch, heads, length, head_dim)
    v = randn(batch, heads, length, head_dim, std=1.0)
    favor = get_feature_map("favor", head_dim, r=1024)
    rows = []
    for m in prefix_lengths:
        prefix_k, prefix_v = randn(heads, m, head_dim), randn(heads, m, head_dim, std=1.0)
        exact = prefix_attention(q, k, v, prefix_k, prefix_v, is_causal=True)
        row = {"prefix_length": m}
        row["exact_ms"] = 1e3 * _best_time(
            functools.partial(prefix_attention, q, k, v, prefix_k, prefix_v, is_causal=True)
        )
        for name, phi in (("favor", favor), ("taylor", "taylor")):
            z, kappa = prefix_to_state(prefix_k, prefix_v, phi)
            approx = ntk_attention(q, k, v, z, kappa, feature_map=phi, is_causal=True)
            row[f"{name}_rel_error"] = float((approx - exact).norm() / exact.norm())
            row[f"{name}_ms"] = 1e3 * _best_time(
                functools.partial(ntk_attention, q, k, v, z, kappa, feature_map=phi, is_causal=True)
            )
            row[f"{name}_state_floats"] = z.numel() + kappa.numel()
        row["prefix_floats"] = prefix_k.numel() + prefix_v.numel()
        rows.append(row)
    return rows


def format_ops_demo(rows: list[dict[str, float]]) -> str:
    header = (
        "| prefix m | exact ms | FAVOR+ r=1024 rel. err | ms | Taylor rel. err | ms "
        "| prefix floats | FAVOR state floats |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['prefix_length']} | {row['exact_ms']:.1f} | {row['favor_rel_error']:.4f} "
            f"| {row['favor_ms']:.1f} | {row['taylor_rel_error']:.4f} | {row['taylor_ms']:.1f} "
            f"| {row['prefix_floats']} | {row['favor_state_floats']} |"
        )
    return "\n".join(lines)


def run_ops_demo_command(args: argparse.Namespace) -> int:
    print(
        "NTK-Attention: a prefix of m keys/values replaced by a constant-size state.\n"
        "Causal attention, B=2, H=4, L=512, D=32; synthetic keys with small logits.\n"
    )
    rows = run_ops_demo(prefix_lengths=tuple(args.prefix_lengths))
    print(format_ops_demo(rows))
    print(
        "\nThe state's cost does not grow with m; exact prefix attention's does. Closed-form\n"
        "states are accurate only for small logits: real models need a trained state."
    )
    return 0


def add_ops_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix-lengths", type=positive_int, nargs="+", default=[256, 4096, 65536],
        metavar="M", help="prefix lengths m the state stands for (default: %(default)s)",
    )
