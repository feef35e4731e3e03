"""Compression settings side by side on the tuning documents: each setting is a budget and
CompressConfig fields, e.g. ``1/32:steps=600,samples=16``; the share of the no-prompt KL gap
each closes on the continuation, per document, worst and mean.

Documents, inputs and evaluation as in experiments/compress_exact_heads.py (the four tuning
documents by default: Anarchism, Autism, Achilles, International Atomic Time; none is
evaluated in compress_prompt.md): the first 512 tokens are the prompt, the next 64 the
continuation. Distillation inputs are the recipe's (``samples`` continuations sampled after the
prompt, ``rereads`` windows of it), built once per (samples, rereads) and shared by the
settings that use them; the teacher is captured once per input set. Time per setting: its own
initialisation and distillation (the shared teacher work is reported apart).

    python experiments/compress_sweep.py --settings 1/32: 1/32:steps=600 --output docs/results/compress_sweep_1_32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ntk_attention.compress import CompressConfig
from ntk_attention.compress.distill import kl_divergence
from ntk_attention.compress.prompt import compress_prefix
from ntk_attention.compress.teacher import (
    capture,
    prompt_prefix,
    retrieval_scores,
)
from ntk_attention.provenance import environment, summary_line

sys.path.insert(0, str(Path(__file__).parent))
import compress_prompt as shared  # noqa: E402  (model, documents, references)

PROMPT, EVAL = 512, shared.EVAL_TOKENS
_INPUT_FIELDS = ("samples", "sample_length", "top_p", "temperature", "rereads")


def parse_setting(text: str) -> tuple[str, dict]:
    """"1/32:steps=600,samples=16" -> ("1/32", {"steps": 600, "samples": 16}); "None" is None."""
    budget, _, fields = text.partition(":")
    if budget not in shared.FRACTIONS:
        raise SystemExit(f"setting {text!r}: budget must be one of {sorted(shared.FRACTIONS)}")
    return budget, shared.config_changes(filter(None, fields.split(",")), f"setting {text!r}")


def run_document(model, title, ids, settings, seed):
    prompt = torch.tensor(ids[:PROMPT])
    continuation = torch.tensor(ids[PROMPT : PROMPT + EVAL])[None]
    full, none = shared.references(model, prompt, continuation)
    no_prompt = kl_divergence(full, none).mean().item()
    prefix, first_logits, _ = prompt_prefix(model, prompt)
    retrieval = retrieval_scores(model, prefix, prompt)
    prepared: dict[tuple, tuple] = {}
    rows = []
    for text in settings:
        budget, changes = parse_setting(text)
        config = CompressConfig(memory_fraction=shared.FRACTIONS[budget], **changes)
        key = tuple(getattr(config, name) for name in _INPUT_FIELDS) + (config.e2e_steps > 0,)
        if key not in prepared:
            mark = time.perf_counter()
            inputs = shared.distillation_inputs(model, prefix, first_logits, prompt, seed, config)
            data = capture(model, prefix, inputs, log_probs=config.e2e_steps > 0)
            prepared[key] = (inputs, data, time.perf_counter() - mark)
        inputs, data, shared_seconds = prepared[key]
        mark = time.perf_counter()
        ntk = compress_prefix(model, prefix, inputs, config=config, seed=seed, progress=False,
                              data=data, retrieval=retrieval)
        seconds = time.perf_counter() - mark
        report, kl = shared.continuation_kl(ntk, continuation, full)
        row = {"document": title, "setting": text, "r": report.r,
               "memory_fraction": report.memory_fraction, "exact_heads": len(report.exact_heads),
               "kl": kl.mean().item(), "closed": 1 - kl.mean().item() / no_prompt,
               "no_prompt_kl": no_prompt, "seconds": seconds, "shared_seconds": shared_seconds}
        rows.append(row)
        print(f"  {text:32s} r={report.r:3d} heads={row['exact_heads']} closed "
              f"{row['closed']:6.1%} {seconds:.0f} s", flush=True)
    return rows


def markdown(document) -> str:
    rows = document["rows"]
    titles = list(dict.fromkeys(r["document"] for r in rows))
    out = ["# Compression settings side by side (SmolLM2-135M, 512-token prompts)", "",
           summary_line(document["environment"]), "",
           "Share of the no-prompt KL gap closed on the 64-token continuation; r = virtual tokens "
           "per KV head left by the budget, heads = exact (retrieval) heads; time = the "
           "setting's own initialisation and distillation (the torch threads above; runs that "
           "shared the machine with another job are slower).", "",
           "| setting | r | heads | " + " | ".join(titles) + " | worst | mean | time (s) |",
           "|---|---|---|" + "---|" * len(titles) + "---|---|---|"]
    for setting in document["settings"]:
        cells = {r["document"]: r for r in rows if r["setting"] == setting}
        closed = [cells[t]["closed"] for t in titles]
        out.append(
            f"| `{setting}` | {cells[titles[0]]['r']} | {cells[titles[0]]['exact_heads']} | "
            + " | ".join(f"{100 * c:.1f}%" for c in closed)
            + f" | {100 * min(closed):.1f}% | {100 * statistics.mean(closed):.1f}% | "
            f"{statistics.mean(c['seconds'] for c in cells.values()):.0f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[0, 1, 5, 11],
                        help="document indices (default: the four tuning documents)")
    parser.add_argument("--settings", nargs="+", required=True,
                        help="budget:field=value,... e.g. 1/32: 1/32:steps=600")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    for text in args.settings:
        parse_setting(text)
    torch.set_num_threads(args.threads)
    model, tokenizer = shared.load_model()
    found = shared.documents(tokenizer, max(args.documents) + 1, PROMPT + EVAL, 0)
    rows = []
    for index in args.documents:
        title, ids = found[index]
        print(title, flush=True)
        rows += run_document(model, title, ids, args.settings, args.seed)
        document = {"environment": environment(), "settings": args.settings, "rows": rows}
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(document))
    print(f"wrote {args.output}.{{json,md}}")


if __name__ == "__main__":
    main()
