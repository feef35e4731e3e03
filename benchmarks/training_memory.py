"""Peak memory of one training step of SmolLM2-135M with the NTK-Attention adapter against a
PEFT LoRA step, at sequence lengths 512 and 2048 on CPU.

Each (method, length) runs in a fresh subprocess: the model is built exactly as the
fine-tuning CLI builds it (``train.methods.build_method``, task kind ``causal-lm``: NTK with
its default state for decoders, LoRA r = 8 on q/v), and the process's first training step
(forward + causal-LM loss + backward + AdamW step + zero_grad, batch 1) runs with the peak RSS
reset just before it:

    step peak = VmHWM during the step - VmRSS before it

i.e. what the step adds on top of the resident model: the activations autograd keeps for the
backward, the backward's temporaries, the gradients and AdamW's moments (the last two are
the trainable parameters' size, under 10 MiB here). The first step is measured because
memory freed by an earlier step stays in the process (the allocator keeps it), which would
hide a later step's peak. The total process peak is reported beside it.

    python benchmarks/training_memory.py --output docs/results/training_memory_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ntk_attention.models import smollm2_path
from ntk_attention.provenance import environment, summary_line
from ntk_attention.train.methods import MethodOptions, build_method
from ntk_attention.train.peak_memory import peak_rss_growth, status_bytes

METHODS = ("ntk", "lora")
TARGET = 1.1  # the NTK step's peak over LoRA's (issue 19)


def measure(method: str, length: int, seed: int = 0) -> dict:
    """One (method, length) in this process: the step's peak over the resident set."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), attn_implementation="sdpa")
    options = MethodOptions(max_length=length, seed=seed)
    model = build_method(method, base, "causal-lm", options)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 40000, (1, length), generator=generator)

    def step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_peak = peak_rss_growth(step)
    process_peak = status_bytes("VmHWM")  # since the reset before the step
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "length": length, "step_peak_bytes": step_peak,
            "process_peak_bytes": process_peak, "trainable_parameters": trainable,
            "saved_bytes": saved_for_backward_bytes(model, input_ids)}


class _Saved:
    """A tensor autograd saved, held through a saved-tensors hook so that its lifetime (the
    graph node's) can be followed by a weak reference."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_for_backward_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward for the backward: the distinct storages of the
    tensors the graph still holds when the loss is formed, the model's own parameters and
    buffers left out (resident anyway). Deterministic, unlike RSS."""
    import gc
    import weakref

    held: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        held.append(weakref.ref(saved))
        return saved

    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    gc.collect()
    storages: dict[int, int] = {}
    for ref in held:
        saved = ref()
        if saved is not None:
            storage = saved.tensor.untyped_storage()
            if storage.data_ptr() not in resident:
                storages[storage.data_ptr()] = storage.nbytes()
    del loss
    return sum(storages.values())


def run_all(lengths: list[int], threads: int, repeats: int) -> list[dict]:
    """Every (length, method) ``repeats`` times, each in a fresh subprocess, interleaved."""
    rows = []
    for length in lengths:
        for repeat in range(repeats):
            for method in METHODS:
                command = [sys.executable, __file__, "--child", method, "--lengths", str(length),
                           "--threads", str(threads)]
                output = subprocess.run(command, check=True, capture_output=True,
                                        text=True).stdout
                row = {**json.loads(output.strip().splitlines()[-1]), "repeat": repeat}
                rows.append(row)
                print(f"L={length} {method} #{repeat}: step peak "
                      f"{row['step_peak_bytes'] / 2**20:.0f} MiB, saved "
                      f"{row['saved_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def markdown(rows: list[dict]) -> str:
    mib = 2**20
    repeats = len({row["repeat"] for row in rows})
    lines = [f"| L | method | trainable parameters | saved for backward | / LoRA | step peak "
             f"(median of {repeats}) | / LoRA | process peak |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for length in sorted({row["length"] for row in rows}):
        of = {m: [r for r in rows if r["length"] == length and r["method"] == m] for m in METHODS}
        lora_saved, lora_peak = _median(of["lora"], "saved_bytes"), _median(of["lora"], "step_peak_bytes")
        for method in METHODS:
            saved, peak = _median(of[method], "saved_bytes"), _median(of[method], "step_peak_bytes")
            lines.append(
                f"| {length} | {method} | {of[method][0]['trainable_parameters']:,} | "
                f"{saved / mib:.0f} MiB | {saved / lora_saved:.2f}x | {peak / mib:.0f} MiB | "
                f"{peak / lora_peak:.2f}x | {_median(of[method], 'process_peak_bytes') / mib:.0f} MiB |"
            )
        for label, key, lora in (("step peak", "step_peak_bytes", lora_peak),
                                 ("saved for backward", "saved_bytes", lora_saved)):
            ratio = _median(of["ntk"], key) / lora
            met = "met" if ratio <= TARGET else "NOT met"
            verdicts.append(f"- L = {length}: NTK {label} / LoRA's = {ratio:.2f}x "
                            f"(target <= {TARGET}x: {met})")
    return "\n".join(lines + ["", "Targets:", *verdicts]) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048],
                        help="sequence lengths (default: 512 2048)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh subprocesses per (length, method); medians (default 3)")
    parser.add_argument("--output", type=Path,
                        help="write OUTPUT.md and OUTPUT.json, e.g. docs/results/training_memory_cpu")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.lengths[0])))
        return
    rows = run_all(args.lengths, args.threads, args.repeats)
    table = markdown(rows)
    intro = ("SmolLM2-135M causal-LM training step, batch 1, built by `build_method` as the CLI "
             "builds it (NTK: the decoder default; LoRA r = 8 on q/v). Saved for backward: the "
             "distinct storages autograd holds after the forward, parameters left out "
             "(deterministic). Step peak: peak RSS during the process's first training step - "
             "RSS before it, each repeat a fresh subprocess (RSS varies from run to run with "
             "the allocator).\n\n")
    print(table)
    if args.output:
        env = environment()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(
            f"# Training-step memory (cpu)\n\n{summary_line(env)}\n\n" + intro + table
        )
        record = {**env, "rows": rows, "table": table}
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
