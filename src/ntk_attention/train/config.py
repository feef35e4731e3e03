"""A run's settings: :class:`TrainConfig`, the checks that refuse bad ones with a
:class:`RunError`, and which settings a resumed run may change.

TrainConfig holds everything that decides a run's result; it is printed at the start of a run
and saved in its results.json and checkpoints (``run_folder`` compares a saved one with the
current one before resuming).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ..ops.sink import check_sink_tokens
from .methods import METHODS, NTK_DEFAULTS, NTK_INITS, MethodOptions

if TYPE_CHECKING:
    from .task_kinds import Kind

__all__ = ["RunError", "TrainConfig"]


class RunError(ValueError):
    """A run that cannot start: bad arguments, a model that does not fit the task, an output
    directory that already holds another run. The message says what to change."""


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
