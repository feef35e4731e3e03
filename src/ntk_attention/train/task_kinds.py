"""The task kinds a run can train ("classification", "image-classification", "causal-lm",
"generation"): for each, the Auto class of its model, how a row becomes an example, how
examples become a batch and how the model is evaluated, in :data:`TASK_KINDS`.

(``train.tasks.KINDS`` is the tuple of the kinds' names that task specs are checked against;
``TASK_KINDS`` maps the same names to how the loop handles them.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from . import metrics

if TYPE_CHECKING:
    from .config import TrainConfig
    from .prepare import Prepared

__all__ = ["TASK_KINDS", "Kind"]


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a task kind is modelled: the Auto class of its model, how rows become examples,
    how examples become a batch, and how the model is evaluated.

    ``head_lr_cap`` caps the default learning rate of a freshly initialised task head. Image
    backbones' pooled features are large (DINOv2-small's: a norm in the tens), so a linear head
    trained at an adapter's lr diverges: on fashion-mnist, NTK's lr 1e-1 gave a validation
    loss of 37 after 4 steps (1e-2: 3.4; the initial loss is ln 10 = 2.3)."""

    auto_class: str
    needs_tokenizer: bool
    encode: Callable[[Any, dict, TrainConfig], dict]
    collate: Callable[[Sequence[dict], Prepared], dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module, Sequence[dict], Prepared], dict[str, float]]
    head_lr_cap: float | None = None


def _encode_classification(row: dict, tokenizer: Any, config: TrainConfig) -> dict:
    ids = tokenizer(row["text"], truncation=True, max_length=config.max_length)["input_ids"]
    return {"input_ids": ids, "label": int(row["label"])}


def _encode_causal_lm(row: dict, tokenizer: Any, config: TrainConfig) -> dict:
    ids = tokenizer(row["text"], truncation=True, max_length=config.max_length)["input_ids"]
    return {"input_ids": ids, "prompt_length": 0}


def _encode_generation(row: dict, tokenizer: Any, config: TrainConfig) -> dict:
    # Target = prompt + completion + eos; the loss covers the completion and eos only. Too
    # long: the prompt loses its beginning (the completion is what is learned and scored).
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    completion = completion[: config.max_length - 2] + [tokenizer.eos_token_id]
    prompt = prompt[max(0, len(prompt) + len(completion) - config.max_length):]
    return {
        "input_ids": prompt + completion,
        "prompt_length": len(prompt),
        "completion": row["completion"],
    }


def _encode_image(row: dict, tokenizer: Any, config: TrainConfig) -> dict:
    return {"image": torch.tensor(row["image"], dtype=torch.uint8), "label": int(row["label"])}


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple:
    """[B, L] ids and attention mask, padded to the longest row (on the right unless left)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(longest - len(sequence), longest) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _collate_classification(examples: Sequence[dict], run: Prepared) -> dict[str, torch.Tensor]:
    ids, mask = _pad([e["input_ids"] for e in examples], run.pad_id)
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _collate_lm(examples: Sequence[dict], run: Prepared) -> dict[str, torch.Tensor]:
    ids, mask = _pad([e["input_ids"] for e in examples], run.pad_id)
    labels = ids.masked_fill(mask == 0, -100)  # [B, L]; pads (even pad = eos) are not targets
    for row, example in enumerate(examples):
        labels[row, : example["prompt_length"]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _collate_image(examples: Sequence[dict], run: Prepared) -> dict[str, torch.Tensor]:
    images = torch.stack([e["image"] for e in examples]).float() / 255.0  # [B, H, W] or [B, H, W, C]
    if images.dim() == 3:
        images = images.unsqueeze(1).expand(-1, 3, -1, -1)  # grey -> 3 channels: [B, 3, H, W]
    else:
        images = images.permute(0, 3, 1, 2)
    size = run.config.image_size
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(run.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(run.image_std).view(1, 3, 1, 1)
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"pixel_values": (images - mean) / std, "labels": labels}


def _batches(examples: Sequence[dict], size: int):
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def _evaluate_classification(model: nn.Module, examples: Sequence[dict], run: Prepared) -> dict:
    predictions, total_loss = [], 0.0
    for chunk in _batches(examples, run.eval_batch_size):
        batch = _to_device(run.kind.collate(chunk, run), run.device)
        out = model(**batch)
        total_loss += float(out.loss) * len(chunk)
        predictions += out.logits.argmax(-1).tolist()
    references = [e["label"] for e in examples]
    return {
        "accuracy": metrics.accuracy(predictions, references),
        "macro_f1": metrics.macro_f1(predictions, references, len(run.label_names)),
        "loss": total_loss / len(examples),
    }


def _lm_nll(model: nn.Module, examples: Sequence[dict], run: Prepared) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``examples``."""
    total_nll, total_tokens = 0.0, 0
    for chunk in _batches(examples, run.eval_batch_size):
        batch = _to_device(_collate_lm(chunk, run), run.device)
        tokens = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        if tokens == 0:
            continue
        out = model(**batch)  # loss = mean NLL over those tokens (virtual tokens are -100)
        total_nll += float(out.loss) * tokens
        total_tokens += tokens
    return total_nll, total_tokens


@torch.no_grad()
def _evaluate_causal_lm(model: nn.Module, examples: Sequence[dict], run: Prepared) -> dict:
    total_nll, total_tokens = _lm_nll(model, examples, run)
    return {"perplexity": metrics.perplexity(total_nll, total_tokens), "loss": total_nll / total_tokens}


@torch.no_grad()
def _evaluate_generation(model: nn.Module, examples: Sequence[dict], run: Prepared) -> dict:
    total_nll, total_tokens = _lm_nll(model, examples, run)
    predictions = []
    for chunk in _batches(examples, run.eval_batch_size):
        prompts = [e["input_ids"][: e["prompt_length"]] for e in chunk]
        ids, mask = _pad(prompts, run.pad_id, left=True)
        out = model.generate(
            input_ids=ids.to(run.device), attention_mask=mask.to(run.device),
            max_new_tokens=run.config.max_new_tokens, do_sample=False,
            pad_token_id=run.pad_id, eos_token_id=run.tokenizer.eos_token_id,
        )
        # Decoder-only generate returns prompt + new tokens; some wrappers only the new ones.
        new = out[:, ids.shape[1]:] if out.shape[1] > ids.shape[1] and torch.equal(
            out[:, : ids.shape[1]].cpu(), ids) else out
        predictions += run.tokenizer.batch_decode(new, skip_special_tokens=True)
    references = [e["completion"] for e in examples]
    return {
        "exact_match": metrics.exact_match(predictions, references),
        "loss": total_nll / max(total_tokens, 1),
    }


TASK_KINDS: dict[str, Kind] = {
    "classification": Kind(
        "AutoModelForSequenceClassification", True, _encode_classification,
        _collate_classification, _evaluate_classification,
    ),
    "image-classification": Kind(
        "AutoModelForImageClassification", False, _encode_image, _collate_image,
        _evaluate_classification, head_lr_cap=1e-3,
    ),
    "causal-lm": Kind(
        "AutoModelForCausalLM", True, _encode_causal_lm, _collate_lm, _evaluate_causal_lm
    ),
    "generation": Kind(
        "AutoModelForCausalLM", True, _encode_generation, _collate_lm, _evaluate_generation
    ),
}
