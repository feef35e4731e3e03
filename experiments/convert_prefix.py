"""A trained PEFT prefix-tuning adapter (P-Tuning v2) converted into NTK-Attention states
(issue 10, item 3): agreement with the PEFT model, the task metric before and after, memory and
speed.

1. Train the PEFT prefix with the finetune CLI: SmolLM2-135M-Instruct on wiki-lm, 64 virtual
   tokens, lr 1e-1 (prefix tuning's best on validation in accuracy_wiki_lm.md), the CPU scale
   of that study (192 training rows, 2 epochs, 64 tokens); skipped when ``--runs`` holds it.
2. Convert it (``convert_prefix``) into exp states of r = 8, 16, 32 virtual tokens, the exact
   one (r = 64), and the elu state; distillation on continuations the prefixed model samples.
3. Report, per state: KL(PEFT || NTK) and top-1 agreement on held-out samples; the task's
   metric, perplexity, on wiki-lm *test* passages (held-out articles, windows of 64 tokens) for
   the PEFT model, the NTK model and the base model alone; the state's size against the
   prefix's KV cache; the forward time of both (batch 1, 64 tokens).

    python experiments/convert_prefix.py --output docs/results/convert_prefix
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import torch

from ntk_attention.compress import CompressConfig, convert_prefix
from ntk_attention.provenance import environment, summary_line

VARIANTS = {
    "exp r=8": CompressConfig(r=8, memory_fraction=None),
    "exp r=16": CompressConfig(r=16, memory_fraction=None),
    "exp r=32": CompressConfig(r=32, memory_fraction=None),
    "exp r=64 (exact)": CompressConfig(r=64, memory_fraction=None),
    "elu": CompressConfig(feature_map="elu", memory_fraction=None),
}


def train_prefix(runs: Path, threads: int, lr: str) -> Path:
    run = runs / f"prefix-64-lr{lr}"
    if not (run / "adapter" / "adapter_config.json").exists():
        command = ["ntk-attention", "finetune", "--task", "wiki-lm", "--method", "prefix",
                   "--prefix-length", "64", "--lr", lr, "--max-train", "192", "--max-eval", "16",
                   "--epochs", "2", "--max-length", "64", "--seed", "0", "--threads", str(threads),
                   "--no-progress", "--output", str(run)]
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    return run / "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/convert_prefix")
    parser.add_argument("--eval-passages", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefix-lr", default="1e-1", help="the PEFT prefix's learning rate")
    parser.add_argument("--output", default="docs/results/convert_prefix")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    adapter = train_prefix(Path(args.runs), args.threads, args.prefix_lr)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ntk_attention.models import smollm2_path
    from ntk_attention.train.tasks.wiki_lm import build

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    eval_texts = build(0)["test"]["text"][: args.eval_passages]
    rows = []
    for name, config in VARIANTS.items():
        started = time.perf_counter()
        ntk = convert_prefix(adapter, base, tokenizer=tokenizer, config=config, eval_texts=eval_texts,
                             progress=False)
        seconds = time.perf_counter() - started
        conversion, report = ntk.conversion, ntk.compression
        base = ntk.unload()
        ppl = conversion["eval_text"]["perplexity"]
        row = {"variant": name, "r": report.r, "memory_fraction": report.memory_fraction,
               "held_out": conversion["held_out"], "eval_text": conversion["eval_text"],
               "forward_seconds": conversion["forward_seconds"], "seconds": seconds}
        rows.append(row)
        print(f"{name:18s} mem {report.memory_fraction:.3f}  KL {conversion['held_out']['kl']:.4f}  "
              f"top-1 {conversion['held_out']['top1']:.3f}  ppl PEFT {ppl['peft_prefix']:.2f} NTK "
              f"{ppl['ntk']:.2f} base {ppl['base']:.2f}  {seconds:.0f} s", flush=True)
    document = {**environment(), "adapter": str(adapter), "rows": rows}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    evaluation = rows[0]["eval_text"]
    lines = ["# A trained PEFT prefix converted into NTK-Attention states (SmolLM2-135M, wiki-lm)", "",
             summary_line(document), "",
             (f"PEFT prefix tuning, 64 virtual tokens, trained on wiki-lm (lr {args.prefix_lr}, 192 rows, 2 epochs). "
              f"Agreement: KL(PEFT || NTK) and top-1 on 4 held-out sampled continuations. Perplexity: "
              f"wiki-lm test passages, {evaluation['windows']} windows of {evaluation['tokens']} tokens. "
              "Memory: the state's stored numbers / the prefix's KV cache."), "",
             "| state | memory | KL | top-1 | perplexity PEFT prefix | perplexity NTK | base model alone | "
             "forward PEFT / NTK (ms) | conversion (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ppl, speed = row["eval_text"]["perplexity"], row["forward_seconds"]
        lines.append(f"| {row['variant']} | {row['memory_fraction']:.3f} | {row['held_out']['kl']:.4f} | "
                     f"{row['held_out']['top1']:.3f} | {ppl['peft_prefix']:.2f} | {ppl['ntk']:.2f} | "
                     f"{ppl['base']:.2f} | {speed['peft_prefix'] * 1e3:.0f} / {speed['ntk'] * 1e3:.0f} | "
                     f"{row['seconds']:.0f} |")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {output}.{{json,md}}")


if __name__ == "__main__":
    main()
