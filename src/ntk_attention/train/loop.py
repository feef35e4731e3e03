"""The fine-tuning loop: one task, one method, a plain PyTorch loop that reads top to bottom.

    prepare(config)   load the task's data, the model and its tokenizer, encode the data and
                      apply the method. Every input check happens here, before anything is
                      written, so bad input never leaves a half-written output directory.
    train(config)     AdamW with linear warm-up and decay; evaluation after every epoch;
                      a checkpoint every ``save_every`` steps and after every epoch; at the end
                      the adapter (or the whole model for ``full``) and ``results.json``.

Determinism and resume. The order of the training rows in epoch e is a permutation drawn from
a generator seeded with (seed, e), and a batch is a slice of it, so the data position is two
integers (epoch, batch). A checkpoint stores the trainable parameters, the optimizer and
scheduler state, every RNG state (dropout draws from torch's) and that position; ``resume``
restores them and skips the batches already seen, so a stopped run continues to the same
parameters and metrics as an uninterrupted one (bitwise on CPU with the same thread count).
Batches are built from the permutation by index, which is what a distributed sampler needs as
well (each rank would take its slice of the same batch).

Output directory:

    results.json        metrics, trainable parameters, step time, peak memory, wall time,
                        versions, git commit, hardware, command and the full config
    adapter/            ``save_pretrained`` of the trained model (PEFT format for adapters)
    checkpoints/        step-XXXXXXXX/ directories and latest.json (see checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sink import check_sink_tokens
from . import metrics
from .checkpoint import (
    CheckpointError,
    atomic_directory,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .distributed import local_device
from .distributed import setup as setup_distributed
from .guards import NonFiniteGuard
from .methods import (
    HEAD_NAMES,
    METHODS,
    NTK_DEFAULTS,
    NTK_INITS,
    MethodError,
    MethodOptions,
    build_method,
    count_parameters,
)

__all__ = [
    "KINDS",
    "CheckpointError",
    "Prepared",
    "RunError",
    "TrainConfig",
    "check_output",
    "environment",
    "epoch_order",
    "load_task_data",
    "prepare",
    "train",
]

RESULTS = "results.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"


class RunError(ValueError):
    """A run that cannot start: bad arguments, a model that does not fit the task, an output
    directory that already holds another run. The message says what to change."""


# ---------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result (printed at the start, saved in results.json).

    task          a built-in task (``train.tasks.TASKS``) or, with ``data``, a task kind
                  ("classification", "causal-lm", "generation")
    method        one of ``methods.METHODS``
    model         a local Hugging Face model directory (None: the task's default model)
    data          a CSV/JSONL file replacing the task's data (split into train/validation/test)
    lr            None: the method's default learning rate for the task's kind (NTK-Attention:
                  ``methods.NTK_DEFAULTS``)
    feature_map, r   NTK-Attention's state; feature_map None: the kind's ``NTK_DEFAULTS``
    sink_tokens   NTK-Attention: "auto" (1 for decoders, 0 for encoders) or an int: the first
                  positions of a sequence that read only the real keys (``NTKConfig``)
    ntk_gated     NTK-Attention: Z = diag(kappa) U (``NTKConfig.gated``); None: the kind's
                  ``NTK_DEFAULTS``
    ntk_init      NTK-Attention: "zeros" (the state starts at zero: the base model) or "text"
                  (decoders: the first ``r`` (default 64) training tokens copied exactly into
                  an exp state, as if they preceded every sequence; then fine-tuned); None:
                  the kind's ``NTK_DEFAULTS``
    head_lr       learning rate of the task head trained beside an adapter (classifier /
                  score); None: ``lr``, capped for image tasks at ``Kind.head_lr_cap``
    max_steps     stop after this many optimizer steps (None: ``epochs`` full epochs)
    max_train, max_eval   use only the first rows of the (seeded, shuffled) splits
    save_every    a checkpoint every this many steps (0: only after each epoch)
    compile       run the model's forward through torch.compile (``nn.Module.compile``: the
                  same results; faster once compiled where the device and shapes allow)
    detect_nonfinite   stop at the first NaN/inf activation, gradient or parameter, naming it
                  (guards.py; costs a check per module output)
    trust_remote_code  run Python files shipped with --model (transformers' flag; off: see
                  SECURITY.md)
    image_size    image tasks: side the images are resized to before the model
    """

    task: str
    method: str
    model: str | None = None
    data: str | None = None
    output: str = "runs/finetune"
    r: int | None = None
    rank: int | None = None
    feature_map: str | None = None
    sink_tokens: int | str = "auto"
    ntk_gated: bool | None = None
    ntk_init: str | None = None
    prefix_length: int = 16
    lora_r: int = 8
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int | None = None
    max_length: int = 128
    max_new_tokens: int = 16
    image_size: int = 112
    max_train: int | None = None
    max_eval: int | None = None
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"
    detect_nonfinite: bool = False
    compile: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RunError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        positive = ("epochs", "batch_size", "max_length", "max_new_tokens", "image_size",
                    "keep_checkpoints")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "max_train", "max_eval", "eval_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("save_every", self.save_every, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                flag = "--" + name.replace("_", "-")
                raise RunError(f"{flag} must be a positive number, got {value!r}")
        try:
            check_sink_tokens(self.sink_tokens, auto=True)
        except ValueError as error:  # the flag's name instead of the field's
            raise RunError(f"--sink-tokens{str(error).removeprefix('sink_tokens')}") from None
        if self.ntk_init is not None and self.ntk_init not in NTK_INITS:
            raise RunError(f"--ntk-init must be one of {NTK_INITS}, got {self.ntk_init!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise RunError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise RunError(
                f"weight_decay must be >= 0 and max_grad_norm > 0, got {self.weight_decay!r} "
                f"and {self.max_grad_norm!r}"
            )

    def resolved_ntk_init(self, kind: str) -> str:
        """``ntk_init``, or the kind's default (``NTK_DEFAULTS``) where the state asked for can
        start as text (an exp state with a dense Z), else "zeros"."""
        return _resolved_ntk_init(self.to_dict(), kind)

    def learning_rate(self, kind: str) -> float:
        """``lr``, or the method's default for a task of ``kind``."""
        return self.lr if self.lr is not None else METHODS[self.method].lr_for(kind)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting's default, by field name."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def head_learning_rate(self, kind: Kind, kind_name: str) -> float:
        """``head_lr``, or ``learning_rate(kind_name)`` capped at the kind's ``head_lr_cap``."""
        if self.head_lr is not None:
            return self.head_lr
        cap, lr = kind.head_lr_cap, self.learning_rate(kind_name)
        return lr if cap is None else min(lr, cap)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_options(self) -> MethodOptions:
        return MethodOptions(
            r=self.r, rank=self.rank, feature_map=self.feature_map, sink_tokens=self.sink_tokens,
            gated=self.ntk_gated,
            prefix_length=self.prefix_length, lora_r=self.lora_r, max_length=self.max_length,
            seed=self.seed,
        )


def _resolved_ntk_init(settings: dict[str, Any], kind: str | None) -> str | None:
    """What ``ntk_init`` means in a run's settings (None: the kind's default, see
    :meth:`TrainConfig.resolved_ntk_init`); as given where the kind is unknown."""
    init = settings.get("ntk_init")
    if init is not None or kind not in NTK_DEFAULTS:
        return init
    return NTK_DEFAULTS[kind].init if _can_start_as_text(settings) else "zeros"


def _can_start_as_text(settings: dict[str, Any]) -> bool:
    """Whether the state asked for can be a text's exact cache: an exp state (feature map
    unset or "exp") with a dense Z."""
    return settings.get("feature_map") in (None, "exp") and settings.get("rank") is None


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        flag = "--" + name.replace("_", "-")
        raise RunError(f"{flag} must be an int >= {minimum}, got {value!r}")


# Fields a resumed run may change without changing its result.
_RESUME_MAY_CHANGE = frozenset(
    {"output", "save_every", "keep_checkpoints", "device", "detect_nonfinite", "trust_remote_code",
     "compile"}
)


# ---------------------------------------------------------------------------------- data


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


KINDS: dict[str, Kind] = {
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


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of the training rows in ``epoch``: a permutation that depends only on
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


# ---------------------------------------------------------------------------------- prepare


@dataclasses.dataclass
class Prepared:
    """A run ready to train: the model with the method applied, the encoded splits and what
    batching needs. Nothing has been written to disk."""

    config: TrainConfig
    task: Any
    kind: Kind
    model: nn.Module
    tokenizer: Any
    model_path: Path
    splits: dict[str, list[dict]]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    device: torch.device
    pad_id: int = 0
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size or 2 * self.config.batch_size

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]


def load_task_data(config: TrainConfig) -> Any:
    """The task ``config`` names (built-in, or a --data file split into a task); data
    problems become a :class:`RunError`."""
    from .tasks import DataError

    try:
        return _load_task(config)
    except DataError as error:
        raise RunError(str(error)) from None


def _load_task(config: TrainConfig) -> Any:
    from . import tasks

    limits = {"seed": config.seed, "max_train": config.max_train, "max_eval": config.max_eval}
    if config.data is None:
        if config.task not in tasks.TASKS:
            raise RunError(
                f"--task must be one of {sorted(tasks.TASKS)} (or, with --data FILE, one of "
                f"{sorted(KINDS)}), got {config.task!r}"
            )
        return tasks.load_task(config.task, **limits)
    builtin = tasks.TASKS.get(config.task)
    kind = builtin.kind if builtin is not None else config.task
    if kind not in tasks.user_data.USER_COLUMNS:
        raise RunError(
            f"with --data, --task must be one of {sorted(tasks.user_data.USER_COLUMNS)} or a "
            f"built-in text task, got {config.task!r}"
        )
    # A built-in task's label set holds the file to it (an unknown label is an error).
    label_names = builtin.label_names if builtin is not None and builtin.label_names else None
    return tasks.user_task(config.data, kind, label_names=label_names, **limits)


def _model_path(config: TrainConfig, task: Any) -> Path:
    from . import tasks

    if config.model:
        return Path(config.model)
    builtin = tasks.TASKS.get(config.task)
    if task.spec.default_model is None and (builtin is None or builtin.default_model is None):
        raise RunError(f"task {task.name!r} has no default model: pass --model DIR")
    spec = task.spec if task.spec.default_model is not None else builtin
    from ..models import ModelUnavailableError

    try:
        return Path(spec.default_model())
    except ModelUnavailableError as error:
        raise RunError(f"task {task.name!r}: its default model is unavailable ({error})") from None


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise RunError(f"--model {path}: not a directory (expected a local Hugging Face model)")
    if not (path / "config.json").is_file():
        raise RunError(f"--model {path}: no config.json, not a Hugging Face model directory")


def _load_model(
    kind_name: str, kind: Kind, path: Path, label_names: Sequence[str], trust_remote_code: bool
) -> nn.Module:
    import transformers

    auto = getattr(transformers, kind.auto_class)
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise RunError(
                f"--model {path} ships its own Python code, which runs only with "
                "--trust-remote-code (read the code first; see SECURITY.md)"
            ) from None
        raise RunError(f"--model {path}: cannot read its config.json ({error})") from None
    if kind_name in ("causal-lm", "generation") and not _is_decoder(config):
        raise RunError(
            f"--model {path} ({config.model_type}) is a bidirectional encoder, not a decoder: "
            f"it cannot be trained for {kind_name!r} (use a causal LM such as SmolLM2)"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if label_names:
        kwargs |= {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
            "ignore_mismatched_sizes": True,  # a head trained for other labels is replaced
        }
    try:
        return auto.from_pretrained(path, **kwargs)
    except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunError(
            f"--model {path} ({config.model_type}) cannot be used for {kind_name!r}: "
            f"{kind.auto_class} cannot load it ({first_line})"
        ) from None


def _is_decoder(config: Any) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    if getattr(config, "is_decoder", False):
        return True
    # Families whose causal-LM class is a decoder by construction (no is_decoder switch).
    import transformers

    encoder_only = transformers.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return config.model_type not in encoder_only


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device must be 'auto', 'cpu' or 'cuda[:i]', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but no CUDA device is available")
    return device


def prepare(config: TrainConfig, task: Any = None) -> Prepared:
    """Load and check everything the run needs; write nothing. ``task`` overrides the task
    ``config`` names (tests pass small in-memory tasks)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    device = _resolve_device(local_device(config.device))  # under torchrun: the rank's GPU
    task = task if task is not None else load_task_data(config)
    kind = KINDS[task.kind]
    label_names = tuple(task.label_names)
    if kind.auto_class != "AutoModelForCausalLM" and len(label_names) < 2:
        raise RunError(f"classification needs at least 2 labels, the task has {list(label_names)}")
    for split in ("train", "validation", "test"):
        if split not in task.data or len(task.data[split]) == 0:
            raise RunError(f"task {task.name!r} has no {split!r} rows")
    model_path = _model_path(config, task)
    _check_model_dir(model_path)

    tokenizer, pad_id = None, 0
    image_mean, image_std = Prepared.image_mean, Prepared.image_std
    if kind.needs_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=config.trust_remote_code
            )
        except (OSError, ValueError, TypeError) as error:
            raise RunError(f"--model {model_path}: cannot load its tokenizer ({error})") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
        if tokenizer.eos_token_id is None:
            tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
        pad_id = tokenizer.pad_token_id
    elif (model_path / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(
            model_path, trust_remote_code=config.trust_remote_code
        )
        image_mean = tuple(getattr(processor, "image_mean", image_mean))
        image_std = tuple(getattr(processor, "image_std", image_std))

    torch.manual_seed(config.seed)  # the new head and the method's random inits
    model = _load_model(task.kind, kind, model_path, label_names, config.trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
        model.config.pad_token_id = pad_id  # sequence classification by decoders needs it
    splits = {
        split: [kind.encode(row, tokenizer, config) for row in task.data[split]]
        for split in ("train", "validation", "test")
    }
    try:
        if config.method == "ntk" and config.resolved_ntk_init(task.kind) == "text":
            model = _warm_started_ntk(model, task.kind, splits["train"], config)
        else:
            model = build_method(config.method, model, task.kind, config.method_options())
    except MethodError as error:
        raise RunError(str(error)) from None
    except ValueError as error:  # the adapter's config and model checks
        raise RunError(f"--method {config.method}: {error}") from None
    model.to(device)
    return Prepared(
        config=config, task=task, kind=kind, model=model, tokenizer=tokenizer,
        model_path=model_path, splits=splits, label_names=label_names,
        metric_names=tuple(task.metric_names), device=device, pad_id=pad_id,
        image_mean=image_mean, image_std=image_std,
    )


def _warm_started_ntk(model: nn.Module, kind: str, train_rows: list[dict], config: TrainConfig):
    """NTK-Attention whose state starts as real text ("prompt -> state -> fine-tune"): the
    first ``config.r`` (default 64) tokens of the training split, rows joined in order, copied
    exactly into exp virtual tokens (``compress.exact_prompt_state``)."""
    from ..compress import CompressError, exact_prompt_state

    if kind not in ("causal-lm", "generation"):
        raise RunError(f"--ntk-init text reads training text into a decoder's cache; {kind!r} "
                       "tasks use --ntk-init zeros")
    if not _can_start_as_text(config.to_dict()):
        raise RunError("--ntk-init text makes an exp state with a dense Z: drop --feature-map "
                       "and --rank (or use --ntk-init zeros)")
    tokens = config.r or NTK_DEFAULTS[kind].r or 64
    ids = [token for row in train_rows for token in row["input_ids"]][:tokens]
    if len(ids) < tokens:
        raise RunError(f"--ntk-init text needs {tokens} training tokens (--r), the training "
                       f"split has {len(ids)}")
    try:
        return exact_prompt_state(model, torch.tensor(ids), seed=config.seed)
    except CompressError as error:
        raise RunError(f"--ntk-init text: {error}") from None


# ---------------------------------------------------------------------------------- run record


class PeakMemory:
    """Peak memory while the block runs: CUDA's max allocated bytes, and on CPU the resident
    set size sampled every 20 ms from /proc (the process high-water mark ``ru_maxrss``
    where /proc is missing, which also counts what ran before the block)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self._page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_rss = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())

    def report(self) -> dict[str, float]:
        out = {"rss_mib": round(self.peak_rss / 2**20, 1)}
        if self.device.type == "cuda":
            out["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    """Package versions, git commit and hardware, for results files."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("ntk-attention", "torch", "transformers", "peft", "datasets", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    hardware = {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {"versions": versions, "git": _git_commit(), "hardware": hardware}


# ---------------------------------------------------------------------------------- train


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def parameter_groups(model: nn.Module, lr: float, head_lr: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: the task head's (any parameter under a module
    named like a head, ``methods.HEAD_NAMES``, PEFT's ``modules_to_save`` copies included) at
    ``head_lr``, the rest at ``lr``. One group when the two rates are equal."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head_lr == lr:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    head = [p for name, p in trainable if HEAD_NAMES.intersection(name.split("."))]
    head_ids = {id(p) for p in head}
    rest = [p for _, p in trainable if id(p) not in head_ids]
    return [group for group in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr})
            if group["params"]]


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def holds_run(output: str | os.PathLike) -> bool:
    """Whether ``output`` holds a run to continue or read back (results or a checkpoint)."""
    output = Path(output)
    checkpoints = output / CHECKPOINTS
    return (output / RESULTS).is_file() or (
        checkpoints.is_dir() and latest_checkpoint(checkpoints) is not None
    )


def check_output(output: Path, config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh); refuses to mix two runs."""
    has_results = (output / RESULTS).is_file()
    checkpoint = latest_checkpoint(output / CHECKPOINTS) if (output / CHECKPOINTS).exists() else None
    if not resume:
        if has_results or checkpoint is not None:
            raise RunError(
                f"--output {output} already holds a run ({RESULTS} or {CHECKPOINTS}/): pass "
                "--resume to continue it, or choose another --output"
            )
        return None
    if checkpoint is None:
        return None
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("config", {})
    changes = _changed_settings(saved, config)
    if changes:
        raise RunError(
            f"--resume: the checkpoint in {output} was made with other settings ({changes}); "
            "resume with the same arguments or choose another --output"
        )
    return checkpoint


def _finished_results(output: Path, config: TrainConfig) -> dict | None:
    """The results of a finished run with this config in ``output`` (resume is then a no-op)."""
    try:
        results = json.loads((output / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    changes = _changed_settings(results.get("config", {}), config)
    if changes:
        raise RunError(
            f"--resume: {output / RESULTS} is a finished run with other settings ({changes}); "
            "choose another --output"
        )
    return results


def _changed_settings(saved: dict[str, Any], config: TrainConfig) -> str:
    """The settings in which a saved run's config differs from ``config``, as "key: saved ->
    current" (empty: the same run). A setting the saved run lacks (added by a later version)
    counts as its default, so older runs still resume and read back."""
    current = config.to_dict()
    saved = {**TrainConfig.defaults(), **saved}
    # ntk_init None means the kind's default: two runs differ only if what it means differs.
    from . import tasks

    builtin = tasks.TASKS.get(config.task)
    kind = builtin.kind if builtin is not None else config.task
    if config.method == "ntk":
        saved["ntk_init"] = _resolved_ntk_init(saved, kind)
        current["ntk_init"] = _resolved_ntk_init(current, kind)
    differ = sorted(
        key for key in set(saved) | set(current)
        if key not in _RESUME_MAY_CHANGE and saved.get(key) != current.get(key)
    )
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    task: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> dict[str, Any] | None:
    """Run ``config`` to the end and return its results (also written to results.json).

    ``resume``: continue from the latest checkpoint in ``config.output`` if there is one
    (a finished run's results are returned as they are). ``stop_after_steps`` stops the run
    after that many steps without writing anything more, as a crash would (returns None);
    tests use it to check that resuming reaches the uninterrupted result.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    output = Path(config.output)
    if resume and (output / RESULTS).is_file():
        finished = _finished_results(output, config)
        if finished is not None:
            log(f"{output / RESULTS}: this run has already finished")
            return finished
    checkpoint = check_output(output, config, resume)
    run = prepare(config, task)
    dist = setup_distributed(run.device)  # rank 0 of 1 unless launched by torchrun/accelerate
    if not dist.is_main:
        log, progress = (lambda message: None), False
    model, train_rows = run.model, run.splits["train"]
    if config.compile:  # in place: the module (and what saves it) stays the same object
        model.compile()

    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = int(config.warmup_ratio * total_steps)
    lr = config.learning_rate(run.task.kind)
    head_lr = config.head_learning_rate(KINDS[run.task.kind], run.task.kind)
    groups = parameter_groups(model, lr, head_lr)
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))
    n_trainable, n_total = count_parameters(model)

    step, epoch, batch_in_epoch = 0, 0, 0
    history: dict[str, list] = {"train_loss": [], "step_time_s": [], "evals": []}
    elapsed_before = 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history, elapsed_before = state["history"], state["elapsed_s"]
        log(f"resuming from {checkpoint} (step {step}/{total_steps})")

    log(
        f"{config.method} on {run.task.name} ({run.task.kind}): {len(train_rows)} train / "
        f"{len(run.splits['validation'])} validation / {len(run.splits['test'])} test rows, "
        f"{n_trainable:,} trainable of {n_total:,} parameters, {total_steps} steps, "
        f"lr {lr:g}"
        + (f" (head {head_lr:g})" if head_lr != lr else "")
        + f", batch {config.batch_size}, model {run.model_path}"
    )

    def trainer_state() -> dict[str, Any]:
        return {
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "history": history,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "config": config.to_dict(),
        }

    def checkpoint_now() -> None:
        if not dist.is_main:
            return
        save_checkpoint(
            output / CHECKPOINTS, step=step, model=model, optimizer=optimizer,
            scheduler=scheduler, trainer_state=trainer_state(), keep=config.keep_checkpoints,
        )

    def evaluate(split: str) -> dict[str, float]:
        model.eval()
        result = run.kind.evaluate(model, run.splits[split], run)
        model.train()
        return result

    bar = tqdm(total=total_steps, initial=step, desc=config.method, disable=not progress,
               dynamic_ncols=True, leave=False)
    forward = dist.wrap(model, run.device)  # DDP: all-reduces the gradients in backward
    guard = NonFiniteGuard(model, enabled=config.detect_nonfinite)
    with PeakMemory(run.device) as memory, guard:
        model.train()
        while step < total_steps:
            order = epoch_order(len(train_rows), config.seed, epoch)
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            while batch_in_epoch < len(batches) and step < total_steps:
                tick = time.perf_counter()
                guard.step = step + 1
                rows, loss_scale = dist.shard(batches[batch_in_epoch])  # all rows on one process
                batch = run.kind.collate([train_rows[i] for i in rows], run)
                loss = forward(**_to_device(batch, run.device)).loss * loss_scale
                dist.backward(loss, model)
                guard.check_gradients()
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                guard.check_parameters()
                loss = dist.mean(loss)  # the global batch's loss
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                history["train_loss"].append(float(loss.detach()))
                history["step_time_s"].append(time.perf_counter() - tick)
                bar.update(1)
                bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}", epoch=epoch)

                end_of_epoch = batch_in_epoch == len(batches) or step == total_steps
                if end_of_epoch:
                    result = evaluate("validation")
                    history["evals"].append({"epoch": epoch, "step": step, **result})
                    bar.write(f"epoch {epoch} step {step}: validation " + _format_metrics(result))
                    epoch, batch_in_epoch = epoch + 1, 0  # saved as "next: epoch + 1, batch 0"
                if end_of_epoch or (config.save_every and step % config.save_every == 0):
                    checkpoint_now()
                if stop_after_steps is not None and stop_after_steps <= step < total_steps:
                    bar.close()
                    return None
                if end_of_epoch:
                    break  # the next epoch has its own order
        bar.close()
        test = evaluate("test")
    log(f"test: {_format_metrics(test)}")

    validation = history["evals"][-1]  # the last step always ends with an evaluation
    timed = history["step_time_s"][1:] or history["step_time_s"]  # the first step warms up
    results = {
        "task": run.task.name,
        "kind": run.task.kind,
        "method": config.method,
        "model": str(run.model_path),
        "data": config.data,
        "primary_metric": run.primary_metric,
        "metrics": {
            "validation": {k: v for k, v in validation.items() if k not in ("epoch", "step")},
            "test": test,
        },
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "steps": step,
        "epochs": num_epochs,
        "examples": {split: len(rows) for split, rows in run.splits.items()},
        "learning_rate": config.learning_rate(run.task.kind),
        "step_time_s": {
            "mean": statistics.fmean(timed) if timed else None,
            "median": statistics.median(timed) if timed else None,
        },
        "peak_memory_mib": memory.report(),
        "wall_time_s": elapsed_before + time.perf_counter() - started,
        "resumed_from_step": None if checkpoint is None else int(checkpoint.name.split("-")[1]),
        "history": history,
        **environment(),
        "command": sys.argv,
        "config": config.to_dict(),
    }
    if dist.is_main:  # every rank holds the same parameters; one writes them
        with atomic_directory(output / ADAPTER) as tmp:
            model.save_pretrained(tmp)
            if config.method == "full" and run.tokenizer is not None:
                run.tokenizer.save_pretrained(tmp)
        atomic_write_json(output / RESULTS, results)
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)  # the run is complete
    dist.barrier()
    return results


def _format_metrics(result: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in result.items() if k not in ("epoch", "step"))

