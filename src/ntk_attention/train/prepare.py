"""Everything a run needs before its first step: :func:`prepare` loads the task's data, the
model and its tokenizer (or image statistics), picks the device, encodes the splits and
applies the method (NTK-Attention's state warm-started from training text with
``--ntk-init text``). Every input check happens here, before anything is written, so bad
input never leaves a half-written output directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunError, TrainConfig, _can_start_as_text
from .distributed import local_device
from .methods import NTK_DEFAULTS, MethodError, build_method
from .task_kinds import TASK_KINDS, Kind

__all__ = ["Prepared", "load_task_data", "prepare"]


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
                f"{sorted(TASK_KINDS)}), got {config.task!r}"
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
    from ..models import ModelUnavailableError, resolve_model
    from . import tasks

    if config.model:
        try:
            return resolve_model(config.model)
        except ModelUnavailableError as error:
            raise RunError(f"--model {error}") from None
    builtin = tasks.TASKS.get(config.task)
    if task.spec.default_model is None and (builtin is None or builtin.default_model is None):
        raise RunError(f"task {task.name!r} has no default model: pass --model DIR")
    spec = task.spec if task.spec.default_model is not None else builtin
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
    kind = TASK_KINDS[task.kind]
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
