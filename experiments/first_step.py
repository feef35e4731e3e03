"""What one optimizer step does to a causal LM, per position: NTK-Attention against LoRA and
prefix tuning on SmolLM2-135M (wiki-lm passages).

Why: in ``accuracy_wiki_lm`` NTK-Attention made perplexity *worse* than the untrained model at
every learning rate, and its training loss jumped from ~3.8 to ~10-11 after its first update
whatever the lr (1e-4 or 1e-3). The suspected mechanism: the state starts at Z = 0, kappa = 0,
and Adam's first step moves every coordinate by about the lr, so after it
kappa ~ lr and Z ~ +-lr. The state then adds mass a = phi(q)^T kappa and a value
b / a = phi(q)^T Z / phi(q)^T kappa whose size does not depend on the lr (the ratio of two
things both ~ lr). A query that sees many keys (large sum_j e^{l_j}) barely notices; the
first positions of a causal model see one or a few keys, so even a tiny mass takes over their
attention output, and every later token reads those positions (the attention sink).

The script takes one AdamW step (the fine-tuning CLI's first step: its warmup starts at lr / 3;
here the lr is used as given) on a batch of 16 training passages and reports the mean
negative log-likelihood per position on 16 held-out passages before and after it.

Methods: ``ntk-default`` is NTK-Attention as the finetune CLI sets it up for causal LMs (its
state, init and the first position exempt); ``ntk`` the paper's elu state from zero with the
first position exempt (``sink_tokens`` "auto"); ``ntk-nosink`` the same state read by every
position (the recipe before the exemption); ``ntk-elu`` / ``ntk-exp64`` a given feature map
with the exemption; ``-gated``: Z = diag(kappa) U; ``ntk-sink4``: the first 4 positions
exempt.

    python experiments/first_step.py --output docs/results/first_step
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

BUCKETS = ((0, 1), (1, 2), (2, 4), (4, 16), (16, 64))  # predicted positions [start, end)
# method name -> (method, MethodOptions fields)
VARIANTS = {
    "ntk-default": ("ntk", {}),
    "ntk": ("ntk", {"feature_map": "elu"}),
    "ntk-nosink": ("ntk", {"feature_map": "elu", "sink_tokens": 0}),
    "ntk-elu": ("ntk", {"feature_map": "elu"}),
    "ntk-exp64": ("ntk", {"feature_map": "exp", "r": 64}),
    "ntk-elu-gated": ("ntk", {"feature_map": "elu", "gated": True}),
    "ntk-exp64-gated": ("ntk", {"feature_map": "exp", "r": 64, "gated": True}),
    "ntk-sink4": ("ntk", {"sink_tokens": 4}),
    "lora": ("lora", {}),
    "prefix": ("prefix", {}),
}


def position_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL of predicting token t + 1 at each position t, [L - 1]."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
    )
    return nll.mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["ntk-default", "ntk", "ntk-nosink", "lora", "prefix"],
                        choices=list(VARIANTS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ntk_attention.models import smollm2_path
    from ntk_attention.train.config import TrainConfig
    from ntk_attention.train.methods import MethodOptions, build_method
    from ntk_attention.train.prepare import _warm_started_ntk
    from ntk_attention.train.tasks.wiki_lm import build

    splits = build(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())

    def batch(split: str) -> torch.Tensor:
        texts = splits[split]["text"][: args.batch]
        return tokenizer(texts, truncation=True, max_length=args.length, padding="max_length",
                         return_tensors="pt")["input_ids"]

    train_ids, held_out = batch("train"), batch("validation")

    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), attn_implementation="sdpa")

    base = position_nll(load().eval(), held_out)
    records = []
    for method in args.methods:
        for lr in args.lrs:
            torch.manual_seed(0)
            name, options = VARIANTS[method]
            if method == "ntk-default":  # the finetune CLI's defaults for causal LMs
                config = TrainConfig(task="wiki-lm", method="ntk", max_length=args.length)
                model = load()
                if config.resolved_ntk_init("causal-lm") == "text":
                    rows = [{"input_ids": row.tolist()} for row in train_ids]
                    model = _warm_started_ntk(model, "causal-lm", rows, config)
                else:
                    model = build_method("ntk", model, "causal-lm", config.method_options())
            else:
                model = build_method(
                    name, load(), "causal-lm", MethodOptions(max_length=args.length, **options)
                )
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            before = position_nll(model.eval(), held_out)
            model.train()
            loss = model(input_ids=train_ids, labels=train_ids).loss
            loss.backward()
            optimizer.step()
            after = position_nll(model.eval(), held_out)
            record = {"method": method, "lr": lr, "train_loss": loss.item(),
                      "before": before.tolist(), "after": after.tolist()}
            records.append(record)
            print(f"{method:7s} lr {lr:g}: held-out NLL {before.mean():.3f} -> {after.mean():.3f}",
                  flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv)
    from ntk_attention.provenance import environment, summary_line

    env = {**environment(command), "threads": args.threads}
    args.output.with_suffix(".json").write_text(
        json.dumps({"env": env, "base": base.tolist(), "records": records}, indent=1)
    )
    header = " | ".join(f"pos {a}" if b - a == 1 else f"pos {a}-{b - 1}" for a, b in BUCKETS)
    lines = [
        "# One optimizer step on a causal LM, per position (SmolLM2-135M, wiki-lm)",
        "",
        summary_line(env),
        "",
        "Mean NLL of the "
        f"next token at each position of {args.batch} held-out validation passages "
        f"({args.length} tokens), after one AdamW step on {args.batch} training passages; "
        "the untrained model first. Position t predicts token t + 1 having seen t + 1 tokens.",
        "",
        f"| method | lr | all | {header} |",
        "|---|---|---|" + "---|" * len(BUCKETS),
    ]

    def row(name: str, lr: str, nll: list[float]) -> str:
        cells = [sum(nll[a:b]) / (b - a) for a, b in BUCKETS]
        return (f"| {name} | {lr} | {sum(nll) / len(nll):.2f} | "
                + " | ".join(f"{c:.2f}" for c in cells) + " |")

    lines.append(row("untrained", "-", base.tolist()))
    for record in records:
        lines.append(row(record["method"], f"{record['lr']:g}", record["after"]))
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
