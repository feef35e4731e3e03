"""The optimizer's learning rates: the adapter's ``lr`` and the task head's ``head_lr``
(a freshly initialised classifier trained beside an adapter; capped by default for image
tasks, whose backbone features are large)."""

from __future__ import annotations

import pytest

from ntk_attention.train.config import RunError, TrainConfig
from ntk_attention.train.loop import parameter_groups
from ntk_attention.train.methods import MethodOptions, build_method
from ntk_attention.train.task_kinds import TASK_KINDS

from support.testing_models import ARCHITECTURES


def _config(**overrides) -> TrainConfig:
    return TrainConfig(task="bbc-news", method="ntk", **overrides)


def test_head_lr_defaults_to_lr_and_is_capped_for_image_tasks():
    text, image = TASK_KINDS["classification"], TASK_KINDS["image-classification"]
    args_text, args_image = (text, "classification"), (image, "image-classification")
    assert _config(lr=0.1).head_learning_rate(*args_text) == 0.1
    assert _config(lr=0.1).head_learning_rate(*args_image) == image.head_lr_cap == 1e-3
    assert _config(lr=1e-4).head_learning_rate(*args_image) == 1e-4  # a cap, not a floor
    assert _config(lr=0.1, head_lr=0.05).head_learning_rate(*args_image) == 0.05  # explicit wins


def test_ntk_defaults_follow_the_task_kind():
    """Without --lr / --feature-map NTK-Attention takes its kind's NTK_DEFAULTS; other methods
    keep one default lr; an explicit value always wins."""
    from ntk_attention.train.methods import METHODS, NTK_DEFAULTS

    for kind, defaults in NTK_DEFAULTS.items():
        assert _config().learning_rate(kind) == defaults.lr
        assert _config(lr=0.5).learning_rate(kind) == 0.5
    lora = TrainConfig(task="wiki-lm", method="lora")
    assert lora.learning_rate("causal-lm") == METHODS["lora"].default_lr
    spec = ARCHITECTURES["llama"]
    ntk = build_method("ntk", spec.build(), "causal-lm", MethodOptions())
    config = ntk.peft_config["default"]
    expected = NTK_DEFAULTS["causal-lm"]
    assert (config.feature_map, config.r, config.sink_tokens) == (expected.feature_map, expected.r, "auto")
    explicit = build_method("ntk", spec.build(), "causal-lm", MethodOptions(feature_map="favor", r=16))
    assert (explicit.peft_config["default"].feature_map, explicit.peft_config["default"].r) == ("favor", 16)


@pytest.mark.parametrize("value", [-1, "all", True])
def test_bad_sink_tokens_are_refused_naming_the_flag(value):
    with pytest.raises(RunError, match="--sink-tokens must be 'auto' or an int >= 0"):
        _config(sink_tokens=value)


@pytest.mark.parametrize("value", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_head_lr_is_refused_naming_the_flag(value):
    with pytest.raises(RunError, match="--head-lr must be a positive number"):
        _config(head_lr=value)


@pytest.mark.parametrize(
    ("arch", "kind", "method"),
    [("bert", "classification", "ntk"), ("bert", "classification", "lora"),
     ("vit", "image-classification", "ntk")],
)
def test_head_parameters_get_head_lr_and_the_adapter_gets_lr(arch, kind, method):
    model = build_method(method, ARCHITECTURES[arch].build(), kind, MethodOptions())
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    groups = parameter_groups(model, lr=0.1, head_lr=1e-3)
    assert [g["lr"] for g in groups] == [0.1, 1e-3]
    adapter, head = ({names[id(p)] for p in g["params"]} for g in groups)
    assert adapter | head == set(names.values()) and not adapter & head
    assert head and all("classifier" in name.split(".") for name in head)
    marker = "ntk_" if method == "ntk" else "lora_"
    assert adapter and all(marker in name for name in adapter)


def test_equal_rates_give_one_group_of_every_trainable_parameter():
    model = build_method("ntk", ARCHITECTURES["bert"].build(), "classification", MethodOptions())
    groups = parameter_groups(model, lr=0.01, head_lr=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups) == 1 and groups[0]["lr"] == 0.01
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable]


def test_a_run_saved_before_head_lr_existed_is_the_same_run():
    """A saved config without a setting added later (at its default) still resumes and reads
    back; a saved value that differs is named."""
    from ntk_attention.train.run_folder import _changed_settings

    config = _config(lr=0.1)
    older = {k: v for k, v in config.to_dict().items() if k != "head_lr"}
    assert _changed_settings(older, config) == ""
    assert _changed_settings({**older, "head_lr": 0.5}, config) == "head_lr: 0.5 -> None"
    assert "lr: 0.2 -> 0.1" in _changed_settings({**older, "lr": 0.2}, config)
