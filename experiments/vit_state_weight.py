"""Which queries does NTK-Attention's state take over in a ViT? Per token and per head, on
DINOv2-small fine-tuned on fashion-mnist (docs/results/REPORT.md section 4: NTK 0.603 vs LoRA
0.712 test accuracy).

NTK-Attention adds to every attention row i a state term,

    out_i = (sum_j e^{l_ij} v_j + b_i) / (S_i + a_i),   S_i = sum_j e^{l_ij},
    a_i = phi(q_i)^T kappa,   b_i = phi(q_i)^T Z,

so the state's weight in row i is w_i = a_i / (S_i + a_i) (0 at init, where kappa = 0). In
decoders the first token (the attention sink, tiny S) was taken over (w ~ 1). In a ViT every
query sees all 1 + P tokens; this script measures which ones the state takes over: the CLS
token (which the classifier reads, with the mean of the patches), the highest-norm patch
tokens (DINOv2's register-like "artifact" tokens, Darcet et al. 2023), or all of them.

What it does:
  1. trains each variant as the accuracy study did (experiments/accuracy.py: the fine-tuning
     loop in-process, 256 training images, 200 validation / 200 test, 3 epochs of batch 16 =
     48 steps, TrainConfig's default image size of 112 px = CLS + 8 x 8 patches); for NTK
     variants at the first seed it keeps the trainable parameters after step 1 (a checkpoint
     at step 1, then the run resumes from it, which the loop guarantees equals an
     uninterrupted run);
  2. for each NTK variant (first seed), after step 1 and at the end, runs ``--images`` test
     images and records, per layer, KV head and query token, log S_i (log-sum-exp of the
     real scaled logits), log a_i (StateTerms' log offset + log mass) and w_i, plus the
     norm of each token's hidden state entering the layer, the norm of the real attention
     output o_i = sum_j softmax(l)_ij v_j, of the state's value b_i / a_i and of the change
     the state makes, out_i - o_i = w_i (b_i / a_i - o_i);
  3. writes per-layer tables (CLS / top-4 highest-norm patches / other patches), counts of
     (layer, head) pairs with w > 0.5 per group, and test accuracies per variant and seed.

Variants: ``ntk`` (lr 1e-1, the study's), ``lora`` (lr 1e-3, the study's), ``ntk-sink1``
(lr 1e-1, the first position, i.e. CLS, exempt from the state: NTKConfig.sink_tokens = 1),
``ntk-lr1e-2`` (lr 1e-2).

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/vit_state_weight.py \
        --variants ntk lora ntk-sink1 --seeds 0 --threads 1 \
        --runs runs/vitdiag --output docs/results/vit_state_weight

Finished runs under --runs are read back (not retrained); the diagnosis is recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

TASK = "fashion-mnist"
TOP = 4  # high-norm patch tokens per image and layer
GROUPS = ("cls", "high", "other")
# name -> (method, lr, extra TrainConfig fields)
VARIANTS: dict[str, tuple[str, float, dict]] = {
    "ntk": ("ntk", 1e-1, {}),
    "lora": ("lora", 1e-3, {}),
    "ntk-sink1": ("ntk", 1e-1, {"sink_tokens": 1}),
    "ntk-lr1e-2": ("ntk", 1e-2, {}),
    # The state as 64 trained virtual tokens: phi(q)_i = exp(s q.W_i + b_i), a mass that grows
    # exponentially in q like the real keys' (elu's grows linearly).
    "ntk-exp64": ("ntk", 1e-1, {"feature_map": "exp", "r": 64}),
    "ntk-exp64-lr1e-2": ("ntk", 1e-2, {"feature_map": "exp", "r": 64}),
}


# ------------------------------------------------------------------------------ training


def make_config(args: argparse.Namespace, variant: str, seed: int, **overrides):
    from ntk_attention.train.config import TrainConfig

    method, lr, extra = VARIANTS[variant]
    fields = dict(
        task=TASK, method=method, lr=lr, seed=seed, max_train=args.max_train,
        max_eval=args.max_eval, epochs=args.epochs, batch_size=args.batch_size, save_every=0,
        output=str(Path(args.runs) / f"{variant}-seed{seed}"), **extra,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def step1_dir(config) -> Path:
    """Where the trainable parameters after step 1 are kept (outside the run's directory,
    whose checkpoints the loop deletes at the end)."""
    return Path(config.output + "-step1")


def train_variant(args: argparse.Namespace, variant: str, seed: int, keep_step1: bool) -> dict:
    """Train (or read back) one run; returns its results.json."""
    from ntk_attention.train.loop import train
    from ntk_attention.train.run_folder import RESULTS

    config = make_config(args, variant, seed)
    output = Path(config.output)
    started = time.perf_counter()
    if keep_step1 and not (output / RESULTS).is_file() and not step1_dir(config).is_dir():
        shutil.rmtree(output, ignore_errors=True)  # a half-done run: start again
        first = make_config(args, variant, seed, save_every=1)
        train(first, resume=False, progress=False, log=print, stop_after_steps=1)
        shutil.copytree(output / "checkpoints" / "step-00000001", step1_dir(config))
    results = train(config, resume=output.exists(), progress=False, log=print)
    test = results["metrics"]["test"]
    print(f"{variant} seed {seed}: test accuracy {test['accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return results


# ------------------------------------------------------------------------------ measuring


class Recorder:
    """Wraps the adapter's call of the op (``tuner.attention.ntk_attention_unchecked``) and
    records, per call (one per layer, in order), the per-query terms in float64."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, original):
        from ntk_attention.ops.sink import state_readers
        from ntk_attention.ops.state import state_terms

        def wrapped(q, k, v, z, kappa, **kw):
            if kw.get("attn_mask") is not None or kw.get("is_causal"):
                raise RuntimeError("expected an unmasked bidirectional call (DINOv2)")
            with torch.no_grad():
                qd, kd, vd = q.double(), k.double(), v.double()
                logits = kw["scale"] * qd @ kd.transpose(-1, -2)  # [B, H, L, L]
                log_s = torch.logsumexp(logits, -1)  # [B, H, L]
                real = torch.softmax(logits, -1) @ vd  # o_i [B, H, L, D]
                readers = None
                if kw.get("sink_tokens"):
                    readers = state_readers(None, q.shape[2], k.shape[2], kw["sink_tokens"],
                                            q.device)
                terms = state_terms(qd, z, kappa, kw["feature_map"], kw.get("state_log_scale"),
                                    readers)
                log_a = terms.log_offset + torch.log(terms.mass.clamp_min(0))  # -inf where 0
                log_w = log_a - torch.logaddexp(log_s, log_a)
                w = log_w.exp()
                value = terms.numer / terms.mass.clamp_min(1e-300).unsqueeze(-1)  # b / a
                change = w.unsqueeze(-1) * (value - real)  # out - o
                # How much the state's value depends on the query: each token's distance from
                # the mean value over the image's tokens, over the mean value norm.
                has = (terms.mass > 0).unsqueeze(-1).double()
                count = has.sum(2, keepdim=True).clamp_min(1)
                centre = (value * has).sum(2, keepdim=True) / count
                typical = (value.norm(dim=-1, keepdim=True) * has).sum(2, keepdim=True) / count
                value_dev = ((value - centre).norm(dim=-1, keepdim=True)
                             / typical.clamp_min(1e-300) * has).squeeze(-1)
                self.calls.append({
                    "log_s": log_s, "log_a": log_a, "w": w,
                    "o_norm": real.norm(dim=-1),
                    "value_norm": torch.where(terms.mass > 0, value.norm(dim=-1), 0.0),
                    "change_norm": change.norm(dim=-1),
                    "value_dev": value_dev,
                })
            return original(q, k, v, z, kappa, **kw)

        return wrapped


def layer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = [m for m in model.modules() if type(m).__name__ == "Dinov2Layer"]
    if not layers:
        raise RuntimeError("no Dinov2Layer in the model")
    return layers


@torch.no_grad()
def measure(model: torch.nn.Module, run, images: int) -> dict[str, torch.Tensor]:
    """Per-token terms on the first ``images`` test images: tensors [N, layers, H, L] for the
    op's terms and [N, layers, L] for the norms of the hidden states entering each layer;
    ``final_norm`` [N, L] is the norm of the last layer's output."""
    import ntk_attention.tuner.attention as attention_module

    recorder = Recorder()
    original = attention_module.ntk_attention_unchecked
    norms: list[torch.Tensor] = []
    final: list[torch.Tensor] = []
    layers = layer_modules(model)

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        norms.append(hidden.double().norm(dim=-1))  # [B, L]

    def last_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        final.append(hidden.double().norm(dim=-1))

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    per_batch: list[dict[str, torch.Tensor]] = []
    attention_module.ntk_attention_unchecked = recorder(original)
    try:
        model.eval()
        rows = run.splits["test"][:images]
        for start in range(0, len(rows), 16):
            recorder.calls.clear()
            norms.clear()
            batch = run.kind.collate(rows[start : start + 16], run)
            model(pixel_values=batch["pixel_values"])
            if len(recorder.calls) != len(layers) or len(norms) != len(layers):
                raise RuntimeError(
                    f"{len(recorder.calls)} op calls and {len(norms)} layer inputs for "
                    f"{len(layers)} layers: the recorder does not see every layer"
                )
            entry = {key: torch.stack([c[key] for c in recorder.calls], 1)
                     for key in recorder.calls[0]}  # [B, layers, H, L]
            entry["norm"] = torch.stack(norms, 1)  # [B, layers, L]
            per_batch.append(entry)
    finally:
        attention_module.ntk_attention_unchecked = original
        for handle in handles:
            handle.remove()
    out = {key: torch.cat([b[key] for b in per_batch]) for key in per_batch[0]}
    out["final_norm"] = torch.cat(final)
    return out


def group_masks(norm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool masks [N, L] per group from one layer's input norms [N, L]: CLS (token 0), the
    TOP highest-norm patches, the other patches."""
    n, length = norm.shape
    cls = torch.zeros(n, length, dtype=torch.bool)
    cls[:, 0] = True
    top = norm[:, 1:].topk(TOP, dim=-1).indices + 1
    high = torch.zeros(n, length, dtype=torch.bool)
    high.scatter_(1, top, True)
    return {"cls": cls, "high": high, "other": ~(cls | high)}


def _mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x [N, H, L] over rows where mask [N, L] is set (finite entries only)."""
    values = x.permute(0, 2, 1)[mask]  # [M, H]
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else float("nan")


def summarise(terms: dict[str, torch.Tensor]) -> dict:
    """Per-layer means per token group, per-head w means, counts of heads with w > 0.5."""
    num_layers, heads = terms["w"].shape[1], terms["w"].shape[2]
    layers, head_w = [], {g: [] for g in GROUPS}
    final_masks = group_masks(terms["final_norm"])
    for layer in range(num_layers):
        norm = terms["norm"][:, layer]  # [N, L]
        masks = group_masks(norm)
        w = terms["w"][:, layer]  # [N, H, L]
        row: dict = {"layer": layer}
        for g, mask in masks.items():
            per_head = w.permute(0, 2, 1)[mask].mean(0)  # [H]
            head_w[g].append([round(float(x), 5) for x in per_head])
            row[g] = {
                "w": _mean(w, mask),
                "w_gt_half_frac": _mean((w > 0.5).double(), mask),
                "heads_w_gt_half": int((per_head > 0.5).sum()),
                "log_s": _mean(terms["log_s"][:, layer], mask),
                "log_a": _mean(terms["log_a"][:, layer], mask),
                "o_norm": _mean(terms["o_norm"][:, layer], mask),
                "value_norm": _mean(terms["value_norm"][:, layer], mask),
                "change_norm": _mean(terms["change_norm"][:, layer], mask),
                "value_dev": _mean(terms["value_dev"][:, layer], mask),
                "hidden_norm": float(norm[mask].mean()),
            }
        row["high_final"] = {"w": _mean(w, final_masks["high"])}
        log_a = terms["log_a"][:, layer]  # [N, H, L]
        finite = torch.isfinite(log_a).all(-1)  # heads whose every token reads the state
        row["log_a_token_std"] = (float(log_a.std(-1)[finite].mean()) if finite.any()
                                  else float("nan"))
        patches = norm[:, 1:]
        row["top4_over_median_norm"] = float(
            (patches.topk(TOP, -1).values.mean(-1) / patches.median(-1).values).mean()
        )
        # Correlation between a patch's input norm and its head-mean w, over all patches.
        wp = w.mean(1)[:, 1:].flatten()
        npch = patches.flatten()
        row["corr_norm_w_patches"] = (
            float(torch.corrcoef(torch.stack([npch, wp]))[0, 1]) if wp.std() > 0 else float("nan")
        )
        layers.append(row)
    totals = {g: sum(r[g]["heads_w_gt_half"] for r in layers) for g in GROUPS}
    return {"layers": layers, "head_w": head_w, "heads_w_gt_half_total": totals,
            "pairs": num_layers * heads}


def diagnose(args: argparse.Namespace, variant: str, seed: int) -> dict:
    """Measure the trained model and, where kept, the model after step 1."""
    from safetensors.torch import load_file

    from ntk_attention import NTKModel
    from ntk_attention.train.prepare import _load_model, prepare
    from ntk_attention.train.run_folder import ADAPTER
    from ntk_attention.train.task_kinds import TASK_KINDS

    config = make_config(args, variant, seed)
    run = prepare(config)  # the test split, the collate function and an NTK model at init
    out: dict = {}
    kept = step1_dir(config)
    if kept.is_dir():
        params = load_file(str(kept / "model.safetensors"))
        named = dict(run.model.named_parameters())
        missing = set(params) ^ {n for n, p in named.items() if p.requires_grad}
        if missing:
            raise RuntimeError(f"step-1 parameters do not match the model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, tensor in params.items():
                named[name].copy_(tensor)
        out["step1"] = summarise(measure(run.model, run, args.images))
    base = _load_model(run.task.kind, TASK_KINDS[run.task.kind], run.model_path,
                       run.label_names, False)
    trained = NTKModel.from_pretrained(base, Path(config.output) / ADAPTER)
    out["final"] = summarise(measure(trained, run, args.images))
    return out


# ------------------------------------------------------------------------------ report


def fmt(x: float, digits: int = 3) -> str:
    if x != x:
        return "-"
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e4):
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def render(data: dict) -> str:
    env = data["environment"]
    versions, hw = env["versions"], env["hardware"]
    lines = [
        "# Which queries NTK-Attention's state takes over in a ViT (DINOv2-small, fashion-mnist)",
        "",
        f"`{data['command']}`",
        "",
        f"Git commit {env['git']['commit']} (dirty: {env['git']['dirty']}); "
        f"{hw['machine']}, {hw['cpu_count']} cores, {hw['torch_threads']} torch thread; "
        f"torch {versions['torch']}, transformers {versions['transformers']}, "
        f"peft {versions['peft']}; wall time {data['wall_time_s'] / 60:.1f} min (this "
        "invocation; finished runs are read back), "
        f"{sum(r['wall_time_s'] for runs in data['accuracy'].values() for r in runs) / 60:.1f} "
        "min of training in the runs.",
        "",
        f"Training as `experiments/accuracy.py` ran it: {data['scale']}; images at "
        f"{data['image_size']} px, i.e. CLS + {data['patches']} patch tokens per image (not the "
        "224 px / 257 tokens REPORT.md section 4 states: TrainConfig's image_size default is "
        "112). Measured on the first "
        f"{data['images']} test images; w_i = a_i / (S_i + a_i), averaged over images, the 6 "
        f"heads and the tokens of a group: CLS; `high` = the {TOP} patches with the largest "
        "hidden-state norm entering that layer (per image); `other` = the remaining patches. "
        "Columns: `heads w>0.5` counts the 6 heads whose mean w over the group exceeds 0.5; "
        "log S and log a are natural logs of the real and the state mass; `top4/median norm` "
        "is the mean top-4 patch norm over the median patch norm (register-like artifact tokens "
        "would stand out by several times); `corr(norm, w)` correlates a patch's norm with its "
        "head-mean w; `change/o` = mean ||out_i - o_i|| / mean ||o_i|| (how much the state moves "
        "the attention output); `std of log a over tokens` (how much the state's mass depends "
        "on the query); `value spread` = ||b_i/a_i - mean_tokens(b/a)|| / mean ||b/a|| (how "
        "much the state's value depends on the query; 0 = the same vector for every token).",
        "",
        "## Test accuracy",
        "",
        "| variant | lr | seeds | test accuracy | per seed |",
        "|---|---|---|---|---|",
    ]
    for variant, runs in data["accuracy"].items():
        accs = [r["accuracy"] for r in runs]
        mean = statistics.fmean(accs)
        spread = f" +- {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        lines.append(
            f"| {variant} | {VARIANTS[variant][1]:g} | {len(accs)} | {mean:.3f}{spread} | "
            + ", ".join(f"{a:.3f}" for a in accs) + " |"
        )
    lines += ["", "Study's numbers (3 seeds): NTK 0.603 +- 0.034, LoRA 0.712 +- 0.025.", ""]
    for variant, stages in data["diagnosis"].items():
        for stage, summary in stages.items():
            lines += [
                f"## {variant}, {'after step 1' if stage == 'step1' else 'trained (48 steps)'}",
                "",
                f"(layer, head) pairs with mean w > 0.5 (of {summary['pairs']}): "
                + ", ".join(f"{g} {n}" for g, n in summary["heads_w_gt_half_total"].items()),
                "",
                "| layer | w CLS | w high | w other | w high (final-norm top 4) | "
                "CLS heads w>0.5 | high heads | other heads | log S CLS / high / other | "
                "log a CLS / high / other | top4/median norm | corr(norm, w) | "
                "change/o CLS / high / other | std of log a over tokens | "
                "value spread CLS / high / other |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for row in summary["layers"]:
                ratio = [row[g]["change_norm"] / row[g]["o_norm"] if row[g]["o_norm"] else
                         float("nan") for g in GROUPS]
                lines.append(
                    f"| {row['layer']} | " + " | ".join(fmt(row[g]["w"]) for g in GROUPS)
                    + f" | {fmt(row['high_final']['w'])} | "
                    + " | ".join(str(row[g]["heads_w_gt_half"]) for g in GROUPS) + " | "
                    + " / ".join(fmt(row[g]["log_s"], 1) for g in GROUPS) + " | "
                    + " / ".join(fmt(row[g]["log_a"], 1) for g in GROUPS) + " | "
                    + f"{fmt(row['top4_over_median_norm'], 2)} | "
                    + f"{fmt(row['corr_norm_w_patches'], 2)} | "
                    + " / ".join(fmt(r, 2) for r in ratio) + " | "
                    + f"{fmt(row['log_a_token_std'], 2)} | "
                    + " / ".join(fmt(row[g]["value_dev"], 2) for g in GROUPS) + " |"
                )
            lines.append("")
            tops = []
            for g in GROUPS:
                flat = sorted(((w, layer, head) for layer, row in enumerate(summary["head_w"][g])
                               for head, w in enumerate(row)), reverse=True)[:5]
                tops.append(f"{g}: " + ", ".join(f"L{lay}H{h} {w:.3f}" for w, lay, h in flat))
            lines += ["Largest per-head mean w (layer L, KV head H): " + "; ".join(tops) + ".",
                      ""]
    lines += ["## Findings", "", data.get("findings", "(see the final report)"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["ntk", "lora", "ntk-sink1"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--extra-seeds", nargs="*", default=[],
                        help="VARIANT:SEED pairs trained besides --seeds (e.g. ntk-sink1:1)")
    parser.add_argument("--diagnose", nargs="*", default=None,
                        help="NTK variants to measure at the first seed (default: every NTK one)")
    parser.add_argument("--max-train", type=int, default=256)
    parser.add_argument("--max-eval", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=32, help="test images measured")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="runs/vitdiag")
    parser.add_argument("--findings", default=None, help="a text file added as the findings")
    parser.add_argument("--output", default="docs/results/vit_state_weight",
                        help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from ntk_attention.provenance import environment

    diagnosed = args.diagnose if args.diagnose is not None else [
        v for v in args.variants if VARIANTS[v][0] == "ntk"]
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    jobs += [(p.split(":")[0], int(p.split(":")[1])) for p in args.extra_seeds]
    accuracy: dict[str, list[dict]] = {}
    for variant, seed in jobs:
        keep = variant in diagnosed and seed == args.seeds[0]
        results = train_variant(args, variant, seed, keep_step1=keep)
        accuracy.setdefault(variant, []).append(
            {"seed": seed, **results["metrics"]["test"],
             "validation_accuracy": results["metrics"]["validation"]["accuracy"],
             "wall_time_s": results["wall_time_s"]})
    diagnosis = {}
    for variant in diagnosed:
        tick = time.perf_counter()
        diagnosis[variant] = diagnose(args, variant, args.seeds[0])
        print(f"diagnosed {variant} ({time.perf_counter() - tick:.0f} s)", flush=True)

    config = make_config(args, args.variants[0], args.seeds[0])
    data = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join(
            ["experiments/vit_state_weight.py", *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment(),
        "wall_time_s": time.perf_counter() - started,
        "scale": (f"{args.max_train} training images, {args.max_eval} validation / "
                  f"{args.max_eval} test, {args.epochs} epochs of batch {args.batch_size}"),
        "image_size": config.image_size,
        "patches": (config.image_size // 14) ** 2,
        "images": args.images,
        "top": TOP,
        "accuracy": accuracy,
        "diagnosis": diagnosis,
    }
    if args.findings:
        data["findings"] = Path(args.findings).read_text()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    output.with_suffix(".md").write_text(render(data))
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
