"""Decoding latency of SmolLM2-135M as the compressed prompt grows from 512 to 8192 tokens:
the full KV cache, the prompt's 1/8 state (``memory_fraction``: its exact heads keep every
prompt token, so it grows with the prompt), and a fixed-size state (``memory_bytes``, the
same bytes for every prompt length: exact heads give way to virtual tokens as the prompt
grows).

Each state's shape (r, exact heads, tokens they keep) is what ``compress_prompt`` would build
for a prompt of that length: ``compress.initial_state.ntk_config_for`` on a prefix of that length and
``CompressConfig.exact_head_count`` heads; the values do not change the time, so the states
are not trained and the cache holds random numbers. Time: median of ``--steps`` single
decoding steps (batch 1, one torch thread), after two warm-up steps; a state decodes as
``generate()`` runs it (each layer builds its state once per call). Size: the bytes stored.

    python benchmarks/state_decode_latency.py --output docs/results/state_decode_latency_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ntk_attention.compress import CompressConfig
from ntk_attention.compress.initial_state import ntk_config_for
from ntk_attention.compress.teacher import PrefixKV, attention_layers
from ntk_attention.models import smollm2_path
from ntk_attention.provenance import environment, summary_line
from ntk_attention.tuner import get_ntk_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from compress_prompt import random_cache, seconds_per_step  # noqa: E402  (the same timing as its decode table)


def state_config(model, m: int, config: CompressConfig):
    """The adapter config compress_prompt builds for an m-token prompt under ``config`` (exact
    heads: the first ones in layer order; which heads does not change the time)."""
    layers, geometry = attention_layers(model)
    shape = (len(layers), geometry.kv_heads, m, geometry.head_dim)
    empty = torch.zeros(()).expand(shape)  # sizes only
    prefix = PrefixKV(empty, empty, geometry, position_offset=m)
    heads = len(layers) * geometry.kv_heads
    count = config.exact_head_count(heads, prefix.kv_cache_numel(), geometry.head_dim)
    exact = tuple((i // geometry.kv_heads, i % geometry.kv_heads) for i in range(count))
    return ntk_config_for(config, prefix, exact_heads=exact), prefix.kv_cache_numel()


@torch.no_grad()
def measure(model, lengths: list[int], memory_bytes: int, steps: int) -> list[dict]:
    from transformers import DynamicCache

    layers, geometry = attention_layers(model)
    token = torch.tensor([[100]])
    rows = []
    for m in lengths:
        cache = random_cache(len(layers), geometry.kv_heads, geometry.head_dim, m, seed=m)
        row = {"prompt_tokens": m, "kv_cache_bytes": 4 * 2 * len(layers) * geometry.kv_heads
               * geometry.head_dim * m}
        row["full_seconds"] = seconds_per_step(
            lambda i, cache=cache, m=m: model(input_ids=token, past_key_values=cache,
                                              use_cache=True, position_ids=torch.tensor([[m + i]])),
            steps)
        del cache
        for name, config in (("fraction", CompressConfig(memory_fraction=1 / 8)),
                             ("fixed", CompressConfig(memory_bytes=memory_bytes))):
            ntk_config, _ = state_config(model, m, config)
            ntk = get_ntk_model(model, ntk_config)
            try:
                empty = DynamicCache()
                # as generate() decodes: each layer builds its state (retrieval heads
                # dequantised and joined) once per call, not per token
                with ntk._decoding():
                    row[f"{name}_seconds"] = seconds_per_step(
                        lambda i, ntk=ntk, empty=empty: ntk(input_ids=token, past_key_values=empty,
                                                            use_cache=True), steps)
                # the bytes stored (4-bit codes are uint8, ranges float32)
                row[f"{name}_bytes"] = sum(t.numel() * t.element_size()
                                           for t in ntk.adapter_state_dict().values())
                row[f"{name}_r"] = ntk_config.r
                row[f"{name}_exact_heads"] = len(ntk_config.exact_heads or ())
            finally:
                ntk.unload()
        print(f"m={m}: full {row['full_seconds'] * 1e3:.1f} ms, 1/8 state "
              f"{row['fraction_seconds'] * 1e3:.1f} ms, fixed state {row['fixed_seconds'] * 1e3:.1f}"
              " ms", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], memory_bytes: int) -> str:
    mib = 2**20
    lines = [f"Fixed state: `CompressConfig(memory_bytes={memory_bytes:,})` "
             f"(`--memory-mib {memory_bytes / mib:.3g}`).", "",
             "| prompt tokens | full cache ms/token (MiB) | 1/8 state ms/token (MiB, r, exact heads) "
             "| fixed state ms/token (MiB, r, exact heads) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['prompt_tokens']} | {row['full_seconds'] * 1e3:.1f} "
            f"({row['kv_cache_bytes'] / mib:.1f}) | {row['fraction_seconds'] * 1e3:.1f} "
            f"({row['fraction_bytes'] / mib:.2f}, {row['fraction_r']}, "
            f"{row['fraction_exact_heads']}) | {row['fixed_seconds'] * 1e3:.1f} "
            f"({row['fixed_bytes'] / mib:.2f}, {row['fixed_r']}, {row['fixed_exact_heads']}) |"
        )
    first, last = rows[0], rows[-1]
    lines += ["", f"From {first['prompt_tokens']} to {last['prompt_tokens']} tokens: full cache "
              f"{last['full_seconds'] / first['full_seconds']:.2f}x, 1/8 state "
              f"{last['fraction_seconds'] / first['fraction_seconds']:.2f}x, fixed state "
              f"{last['fixed_seconds'] / first['fixed_seconds']:.2f}x the time per token."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="prompt lengths (default: 512 1024 2048 4096 8192)")
    parser.add_argument("--memory-mib", type=float, default=3.0,
                        help="the fixed state's size (default: 3, ~1/8 of a 512-token prompt)")
    parser.add_argument("--steps", type=int, default=32, help="timed steps (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--output", type=Path, help="write OUTPUT.md and OUTPUT.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), attn_implementation="sdpa").eval()
    memory_bytes = round(args.memory_mib * 2**20)
    rows = measure(model, args.lengths, memory_bytes, args.steps)
    table = markdown(rows, memory_bytes)
    print(table)
    if args.output:
        env = environment()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(
            f"# Decoding latency of compressed prompts (cpu)\n\n{summary_line(env)}\n\n"
            "SmolLM2-135M, batch 1, one decoding step after the prompt (full cache) or with "
            "the state and an empty cache; median of "
            f"{args.steps} steps.\n\n" + table)
        args.output.with_suffix(".json").write_text(
            json.dumps({**env, "rows": rows, "memory_bytes": memory_bytes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
