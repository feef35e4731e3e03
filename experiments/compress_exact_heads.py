"""How many retrieval (exact) heads a compressed prompt should keep: compress_prompt's exp state
with k exact heads at equal memory, on the documents used to choose the defaults (issue 10).

SmolLM2-135M-Instruct, float32, 1 thread. Documents: Wikipedia articles from the gensim test dump
in file order with at least 576 tokens, chosen by index (default 0, 1, 5, 11: Anarchism, Autism,
Achilles, International Atomic Time; the first two are the experiment's tuning documents, the
other two the hard ones added while tuning; none is evaluated in compress_prompt.md). Per
document: the first 512 tokens are the prompt, the next 64 the continuation; distillation inputs
and evaluation as in experiments/compress_prompt.py (8 sampled continuations + 4 re-read windows,
seed 0; share of the no-prompt KL gap closed on the continuation). Time: prefill, sampling,
capture and retrieval scoring, plus the method's own initialisation and distillation.

    python experiments/compress_exact_heads.py --output docs/results/compress_exact_heads
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
from ntk_attention.compress.teacher import capture, prompt_prefix, retrieval_scores
from ntk_attention.provenance import environment, summary_line

sys.path.insert(0, str(Path(__file__).parent))
import compress_prompt as shared  # noqa: E402  (model, documents, inputs, references)

PROMPT, EVAL = 512, shared.EVAL_TOKENS
SETTINGS = ("1/8:0", "1/8:2", "1/8:4", "1/8:6", "1/32:0", "1/32:1")


def run_document(model, title, ids, settings, seed):
    prompt = torch.tensor(ids[:PROMPT])
    continuation = torch.tensor(ids[PROMPT : PROMPT + EVAL])[None]
    full, none = shared.references(model, prompt, continuation)
    no_prompt = kl_divergence(full, none).mean().item()
    started = time.perf_counter()
    prefix, first_logits, _ = prompt_prefix(model, prompt)
    inputs = shared.distillation_inputs(model, prefix, first_logits, prompt, seed)
    data = capture(model, prefix, inputs)
    retrieval = retrieval_scores(model, prefix, prompt)
    shared_seconds = time.perf_counter() - started
    rows = []
    for setting in settings:
        budget, count = setting.split(":")
        config = CompressConfig(memory_fraction=shared.FRACTIONS[budget], exact_heads=int(count))
        mark = time.perf_counter()
        ntk = compress_prefix(model, prefix, inputs, config=config, seed=seed, progress=False,
                              data=data, retrieval=retrieval)
        seconds = shared_seconds + time.perf_counter() - mark
        report, kl = shared.continuation_kl(ntk, continuation, full)
        row = {"document": title, "budget": budget, "exact_heads": int(count), "r": report.r,
               "memory_fraction": report.memory_fraction, "heads": report.exact_heads,
               "kl": kl.mean().item(), "closed": 1 - kl.mean().item() / no_prompt,
               "worst_position_kl": kl.max().item(), "seconds": seconds}
        rows.append(row)
        print(f"  {budget:4s} k={count} r={report.r:3d} closed {row['closed']:6.1%} "
              f"worst position KL {row['worst_position_kl']:.3f} {seconds:.0f} s", flush=True)
    return rows


def markdown(document) -> str:
    rows = document["rows"]
    titles = list(dict.fromkeys(r["document"] for r in rows))
    out = ["# Exact (retrieval) heads: how many (SmolLM2-135M, 512-token prompts)", "",
           summary_line(document), "",
           "Share of the no-prompt KL gap closed on the 64-token continuation, per document; r is "
           "the virtual tokens per KV head left by the budget.", "",
           "| budget | exact heads | r | " + " | ".join(titles) + " | mean | time (s) |",
           "|---|---|---|" + "---|" * len(titles) + "---|---|"]
    for setting in document["settings"]:
        budget, count = setting.split(":")
        cells = [r for r in rows if r["budget"] == budget and r["exact_heads"] == int(count)]
        by_title = {r["document"]: r for r in cells}
        closed = " | ".join(f"{100 * by_title[t]['closed']:.1f}%" for t in titles)
        mean = statistics.mean(r["closed"] for r in cells)
        seconds = statistics.mean(r["seconds"] for r in cells)
        out.append(f"| {budget} | {count} | {cells[0]['r']} | {closed} | {100 * mean:.1f}% | {seconds:.0f} |")
    heads = {tuple(map(tuple, r["heads"])) for r in rows if r["exact_heads"] == 4}
    out += ["", "The 4 heads chosen (layer, KV head), per document: "
            + "; ".join(str(list(h)) for h in sorted(heads)) + "."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[0, 1, 5, 11])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="budget:exact_heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="docs/results/compress_exact_heads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = shared.load_model()
    found = shared.documents(tokenizer, max(args.documents) + 1, PROMPT + EVAL, 0)
    rows = []
    for index in args.documents:
        title, ids = found[index]
        print(title, flush=True)
        rows += run_document(model, title, ids, args.settings, args.seed)
    document = {**environment(), "settings": args.settings, "rows": rows}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(document))
    print(f"wrote {output}.{{json,md}}")


if __name__ == "__main__":
    main()
