"""Where a causal-LM fine-tune's gain sits, per position: the test NLL of finished wiki-lm runs
(``experiments/accuracy.py``'s run folders) at each position of the 64-token test passages.

Why: NTK-Attention started from real text (``--ntk-init text``) acts as a 64-token context in
front of every passage, and a context helps most where the model has seen least (the first
positions: the untrained model's NLL is 11 at position 0 and 3.2 after position 16). This
says how much of its lead over LoRA and prompt tuning comes from there.

    python experiments/lm_positions.py --runs runs/accuracy_wiki/wiki-lm/untrained-lr1e-12-seed0 \\
        runs/accuracy_wiki/wiki-lm/ntk-text64-lr0.01-seed0 ... --output docs/results/lm_positions
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

BUCKETS = ((0, 1), (1, 2), (2, 4), (4, 16), (16, 63))  # predicting positions [start, end)


def load_run(run: Path):
    """The trained model of a finished run and its prepared data (train.prepare.prepare)."""
    from peft import PeftModel

    from ntk_attention import NTKModel
    from ntk_attention.train.config import TrainConfig
    from ntk_attention.train.prepare import prepare

    saved = json.loads((run / "results.json").read_text())["config"]
    config = TrainConfig(**{**saved, "output": str(run)})
    prepared = prepare(config)
    adapter = run / "adapter"
    try:  # NTKModel and LoRA alike: the bare base model (their layers taken out)
        base = prepared.model.unload()
    except AttributeError:  # PEFT's prompt learning leaves the base model's modules alone
        base = prepared.model.get_base_model()
    loader = NTKModel if config.method == "ntk" else PeftModel
    model = loader.from_pretrained(base, adapter)
    return model.eval(), prepared


@torch.no_grad()
def position_nll(model, prepared, split: str = "test") -> torch.Tensor:
    """Mean NLL of predicting token t + 1 at each position t over the split's passages."""
    from ntk_attention.train.task_kinds import _pad

    rows = prepared.splits[split]
    length = max(len(r["input_ids"]) for r in rows)
    total = torch.zeros(length - 1)
    count = torch.zeros(length - 1)
    for start in range(0, len(rows), 16):
        ids, mask = _pad([r["input_ids"] for r in rows[start : start + 16]], prepared.pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits = logits[:, logits.shape[1] - ids.shape[1] :]  # prompt tuning's virtual tokens
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )
        valid = mask[:, 1:].bool()
        width = nll.shape[1]
        total[:width] += (nll * valid).sum(0)
        count[:width] += valid.sum(0)
    return total / count.clamp_min(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from ntk_attention.provenance import environment

    transformers.logging.set_verbosity_error()
    records = []
    for run in args.runs:
        model, prepared = load_run(run)
        nll = position_nll(model, prepared)
        records.append({"run": str(run), "nll": nll.tolist()})
        print(f"{run.name}: test NLL {nll.mean():.3f} (by position)", flush=True)
    env = environment()
    command = "python " + shlex.join(sys.argv)
    header = " | ".join(f"pos {a}" if b - a == 1 else f"pos {a}-{b - 1}" for a, b in BUCKETS)
    lines = [
        "# Test NLL of finished wiki-lm runs, per position",
        "",
        f"`{command}`",
        "",
        f"Git commit {env['git']['commit']} (dirty: {env['git']['dirty']}); "
        f"{env['hardware']['machine']}, {args.threads} thread(s); torch "
        f"{env['versions']['torch']}. Position t predicts token t + 1 having seen t + 1 tokens "
        "of the passage; the mean over positions weights every position equally.",
        "",
        f"| run | mean | {header} |",
        "|---|---|" + "---|" * len(BUCKETS),
    ]
    for record in records:
        nll = record["nll"]
        cells = [sum(nll[a:b]) / (b - a) for a, b in BUCKETS]
        lines.append(f"| {Path(record['run']).name} | {sum(nll) / len(nll):.3f} | "
                     + " | ".join(f"{c:.2f}" for c in cells) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps(
        {"command": command, "environment": env, "records": records}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
