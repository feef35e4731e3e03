"""Fine-tuning methods: a registry ``METHODS`` from a name to a builder that turns a loaded
base model into the model to train (only the parameters the method trains keep
``requires_grad``).

    ntk     NTK-Attention (our adapter): a state (Z, kappa) per layer and KV head
    lora    LoRA (PEFT) on the query and value projections
    prefix  prefix tuning, P-Tuning v2 style (PEFT PrefixTuningConfig: a deep prefix of
            ``prefix_length`` keys/values in every layer, no reparametrisation MLP)
    prompt  prompt tuning (PEFT PromptTuningConfig): ``prefix_length`` trainable input embeddings
    full    every parameter of the model

For classification kinds the task head (``classifier``, ``score``) is new and trains with
every method (``modules_to_save`` for the adapters, PEFT's and ours).

Positions. A prefix in front of the real tokens shifts their position ids by m in PEFT
(P-Tuning v2's convention). Models with a table of learned absolute positions (BERT and its
kin: 512 rows) then crash once m + length exceeds the table. Here the real tokens keep the
positions they were pretrained with, as NTK-Attention's ``position_offset=0`` does: for
prefix tuning a forward pre-hook on the embeddings sets ``past_key_values_length`` to 0, so
any m works. Prompt tuning cannot avoid the shift (its virtual tokens are real inputs), so it
checks m + max_length against the table and says what to change.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from torch import nn

__all__ = [
    "HEAD_NAMES",
    "METHODS",
    "NTK_DEFAULTS",
    "NTK_INITS",
    "Method",
    "MethodError",
    "MethodOptions",
    "NTKDefaults",
    "build_method",
    "count_parameters",
    "head_names",
    "lora_targets",
]

# Task kinds the loop knows (train.tasks.KINDS), and PEFT's task type for each (None: a plain
# PeftModel, for architectures PEFT has no task class for).
_PEFT_TASK_TYPES = {
    "classification": "SEQ_CLS",
    "image-classification": None,
    "causal-lm": "CAUSAL_LM",
    "generation": "CAUSAL_LM",
}
_HEAD_KINDS = frozenset({"classification", "image-classification"})

# Candidate task-head attribute names, as PEFT's SEQ_CLS default.
_HEAD_CANDIDATES = ("classifier", "score")
HEAD_NAMES = frozenset(_HEAD_CANDIDATES)

# LoRA targets by architecture: the first group whose names all occur in the model wins.
_LORA_TARGETS = (
    ("query", "value"),  # BERT, RoBERTa, ViT, DINOv2
    ("q_proj", "v_proj"),  # Llama, Qwen, Mistral, Gemma, OLMo, SmolLM
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2 (fused qkv)
    ("query_key_value",),  # GPT-NeoX, Falcon
    ("Wqkv",),  # ModernBERT
)


class MethodError(ValueError):
    """A method that cannot be applied to this model or task (the message says why)."""


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """The knobs of all methods (each method reads its own).

    r, rank, feature_map  NTK-Attention: feature dimension, low-rank Z (None: dense), feature
                          map; feature_map None: the task kind's ``NTK_DEFAULTS`` (map and r),
                          r None with a given map: the map's natural size (head dim for "elu")
    sink_tokens           NTK-Attention: the first positions that read only the real keys
                          ("auto": 1 for decoders, 0 for encoders; NTKConfig.sink_tokens)
    gated                 NTK-Attention: Z = diag(kappa) U (NTKConfig.gated); None: the kind's
                          NTK_DEFAULTS
    prefix_length         prefix and prompt tuning: number of virtual tokens m
    lora_r, lora_alpha    LoRA rank and scaling numerator (None: 2 * lora_r)
    max_length            the longest input the run will feed (for position-table checks)
    seed                  random feature maps and the like
    """

    r: int | None = None
    rank: int | None = None
    feature_map: str | None = None
    sink_tokens: int | str = "auto"
    gated: bool | None = None
    prefix_length: int = 16
    lora_r: int = 8
    lora_alpha: int | None = None
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prefix_length", "lora_r", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"{name} must be a positive int, got {value!r}")


# How NTK-Attention's state starts in the fine-tuning loop: at zero (the base model), or as the
# exact cache of the first training tokens (decoders; train.prepare._warm_started_ntk).
NTK_INITS = ("zeros", "text")


@dataclasses.dataclass(frozen=True)
class NTKDefaults:
    """NTK-Attention's settings for one task kind when the user gives none."""

    feature_map: str
    r: int | None  # None: the map's natural size
    lr: float
    gated: bool = False  # NTKConfig.gated: Z = diag(kappa) U
    init: str = "zeros"  # one of NTK_INITS ("text": r training tokens, train.prepare)


# Chosen per kind from the grids in docs/results/REPORT.md section 4 ("Defaults per kind"):
# text encoders train the paper's elu state at lr 1e-1 (bbc-news); ViTs need a state that
# depends on the query: 64 exp features (trained virtual tokens) at lr 1e-1 (fashion-mnist:
# 0.712 against elu's 0.603, vit_state_weight.md); decoders, with the first position exempt
# (sink_tokens "auto"), and best when the state starts as real text: the exact cache of the
# first 64 training tokens (init "text"; wiki-lm and arithmetic), fine-tuned at 1e-2.
NTK_DEFAULTS: dict[str, NTKDefaults] = {
    "classification": NTKDefaults("elu", None, 1e-1),
    "image-classification": NTKDefaults("exp", 64, 1e-1),
    "causal-lm": NTKDefaults("exp", 64, 1e-2, init="text"),
    "generation": NTKDefaults("exp", 64, 1e-2, init="text"),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning method: its name, a line of help, the learning rate it trains well with
    by default (``kind_lr``: per task kind where that differs), and
    ``build(model, kind, options) -> model to train``."""

    name: str
    description: str
    default_lr: float
    build: Callable[[nn.Module, str, MethodOptions], nn.Module]
    kind_lr: dict[str, float] = dataclasses.field(default_factory=dict)

    def lr_for(self, kind: str) -> float:
        """The default learning rate for a task of ``kind``."""
        return self.kind_lr.get(kind, self.default_lr)


# ------------------------------------------------------------------------------------- helpers


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def head_names(model: nn.Module, kind: str) -> list[str]:
    """The task head's module names for a classification kind (none for language modelling:
    the LM head is pretrained and stays frozen)."""
    if kind not in _HEAD_KINDS:
        return []
    children = dict(model.named_children())
    names = [name for name in _HEAD_CANDIDATES if name in children]
    if not names:
        raise MethodError(
            f"{type(model).__name__} has no classification head named one of "
            f"{list(_HEAD_CANDIDATES)}; cannot train it for {kind!r}"
        )
    return names


def lora_targets(model: nn.Module) -> list[str]:
    """The attention projections LoRA adapts in ``model`` (query and value, by architecture)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in _LORA_TARGETS:
        if all(name in leaves for name in group):
            return list(group)
    raise MethodError(
        f"cannot find the query/value projections of {type(model).__name__} for LoRA "
        f"(looked for {[list(g) for g in _LORA_TARGETS]})"
    )


def _position_table(model: nn.Module) -> nn.Embedding | None:
    """The learned absolute position embedding table, if the model has one."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and leaf in ("position_embeddings", "wpe"):
            return module
    return None


def _keep_positions_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # The embeddings would number the real tokens from past_key_values_length (= m, the
    # prefix): number them from 0 as without a prefix. Explicit position ids are left alone.
    if kwargs.get("position_ids") is None and kwargs.get("past_key_values_length"):
        kwargs = {**kwargs, "past_key_values_length": 0}
    return args, kwargs


def _install_keep_positions(model: nn.Module) -> bool:
    """Hook every embeddings module that numbers positions from the cache length. True when
    the model has such a module (then any prefix length works)."""
    installed = False
    for _, module in model.named_modules():
        forward = getattr(type(module), "forward", None)
        if forward is None or _position_table(module) is None:
            continue
        if "past_key_values_length" in inspect.signature(forward).parameters:
            module.register_forward_pre_hook(_keep_positions_hook, with_kwargs=True)
            installed = True
    return installed


def _check_position_room(model: nn.Module, method: str, options: MethodOptions) -> None:
    table = _position_table(model)
    if table is None:
        return  # rotary / relative positions: no table to overflow
    needed = options.prefix_length + options.max_length
    if needed > table.num_embeddings:
        raise MethodError(
            f"{method} shifts the real tokens by prefix_length = {options.prefix_length} "
            f"positions: prefix_length + max_length = {needed} exceeds the "
            f"{table.num_embeddings} learned positions of {type(model).__name__}; use "
            f"--prefix-length <= {table.num_embeddings - options.max_length} or a smaller "
            "--max-length"
        )


def _peft_task_type(kind: str):
    from peft import TaskType

    name = _PEFT_TASK_TYPES[kind]
    return None if name is None else TaskType[name]


def _modules_to_save(model: nn.Module, kind: str) -> list[str] | None:
    # PEFT's SEQ_CLS task type adds the head by itself; other kinds with a head name it.
    if kind in _HEAD_KINDS and _PEFT_TASK_TYPES[kind] is None:
        return head_names(model, kind)
    return None


def _require_text_model(model: nn.Module, method: str, kind: str) -> None:
    if kind == "image-classification":
        raise MethodError(
            f"{method} tuning adds virtual tokens through PEFT, which supports it for text "
            f"models only; {type(model).__name__} is an image model (use ntk, lora or full)"
        )


# ------------------------------------------------------------------------------------- builders


def _build_ntk(model: nn.Module, kind: str, options: MethodOptions) -> nn.Module:
    from ..tuner import NTKConfig, get_ntk_model

    defaults = NTK_DEFAULTS[kind]
    feature_map, r = options.feature_map, options.r
    if feature_map is None:
        feature_map, r = defaults.feature_map, defaults.r if r is None else r
    gated = defaults.gated if options.gated is None else options.gated
    config = NTKConfig(
        feature_map=feature_map,
        r=r,
        rank=options.rank,
        modules_to_save=head_names(model, kind) or None,
        seed=options.seed,
        sink_tokens=options.sink_tokens,
        gated=gated,
    )
    return get_ntk_model(model, config)


def _build_lora(model: nn.Module, kind: str, options: MethodOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=_peft_task_type(kind),
        r=options.lora_r,
        lora_alpha=options.lora_alpha or 2 * options.lora_r,
        lora_dropout=0.0,
        target_modules=lora_targets(model),
        modules_to_save=_modules_to_save(model, kind),
    )
    return get_peft_model(model, config)


def _build_prefix(model: nn.Module, kind: str, options: MethodOptions) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    _require_text_model(model, "prefix", kind)
    if not _install_keep_positions(model):
        _check_position_room(model, "prefix tuning", options)
    config = PrefixTuningConfig(
        task_type=_peft_task_type(kind),
        num_virtual_tokens=options.prefix_length,
        prefix_projection=False,
    )
    return get_peft_model(model, config)


def _build_prompt(model: nn.Module, kind: str, options: MethodOptions) -> nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    _require_text_model(model, "prompt", kind)
    _check_position_room(model, "prompt tuning", options)
    config = PromptTuningConfig(
        task_type=_peft_task_type(kind),
        num_virtual_tokens=options.prefix_length,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    return get_peft_model(model, config)


def _build_full(model: nn.Module, kind: str, options: MethodOptions) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "ntk", "NTK-Attention state (Z, kappa) per layer and KV head", 1e-1, _build_ntk,
            {kind: defaults.lr for kind, defaults in NTK_DEFAULTS.items()},
        ),
        Method("lora", "LoRA (PEFT) on the query and value projections", 1e-2, _build_lora),
        Method("prefix", "prefix tuning, P-Tuning v2 deep prefix (PEFT)", 1e-1, _build_prefix),
        Method("prompt", "prompt tuning, trainable input embeddings (PEFT)", 3e-2, _build_prompt),
        Method("full", "full fine-tuning of every parameter", 5e-5, _build_full),
    )
}


def build_method(name: str, model: nn.Module, kind: str, options: MethodOptions) -> nn.Module:
    """Apply method ``name`` to ``model`` for a task of ``kind``; return the model to train."""
    if name not in METHODS:
        raise MethodError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    if kind not in _PEFT_TASK_TYPES:
        raise MethodError(f"task kind must be one of {sorted(_PEFT_TASK_TYPES)}, got {kind!r}")
    return METHODS[name].build(model, kind, options)
