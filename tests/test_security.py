"""SECURITY.md's claims, checked: no pickle is read or written (safetensors and JSON only;
torch.load only with weights_only=True), remote code runs only with --trust-remote-code, and
writes are atomic (tests/test_crash_safety.py kills real saves)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import transformers

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.models import ModelUnavailableError, minilm_path
from ntk_attention.testing_models import ARCHITECTURES
from ntk_attention.train.checkpoint import save_checkpoint
from ntk_attention.train.loop import RunError, TrainConfig, prepare

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ntk_attention"


def _calls(name: str):
    """(file, call node) for every call of ``...name(...)`` in the package."""
    for file in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield file, node


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_no_pickle_and_torch_load_only_with_weights_only():
    for file in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), file
    for file, node in _calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "torch":
            value = _keyword(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{file}:{node.lineno}"


def test_trust_remote_code_is_never_hard_coded_on():
    for file, node in _calls("from_pretrained"):
        value = _keyword(node, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{file}:{node.lineno}"


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    model = get_ntk_model(ARCHITECTURES["llama"].build(), NTKConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={})
    model.save_pretrained(tmp_path / "adapter")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} == {".safetensors", ".json"}, written
    assert path.parent == tmp_path


def test_a_model_with_remote_code_is_refused_without_the_flag(tmp_path):
    model = tmp_path / "remote"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
    }))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    except ModelUnavailableError:
        pytest.skip("MiniLM's tokenizer is not installed offline")
    tokenizer.save_pretrained(model)  # so that loading reaches the model's config
    config = TrainConfig(task="bbc-news", method="ntk", model=str(model), max_train=4, max_eval=4)
    assert config.trust_remote_code is False
    with pytest.raises(RunError, match=rf"--model {model} ships its own Python code, which runs only with --trust-remote-code"):
        prepare(config)
    assert not marker.exists()


def test_the_cli_flag_reaches_the_config():
    from ntk_attention.cli import _config_from, build_parser

    base = ["finetune", "--task", "bbc-news", "--method", "ntk"]
    assert _config_from(build_parser().parse_args(base)).trust_remote_code is False
    assert _config_from(build_parser().parse_args([*base, "--trust-remote-code"])).trust_remote_code


@pytest.mark.parametrize("name", ["/tmp/escaped", "../up", "a/b", "a\\b", "x.y", "", "a\x00b", "n" * 129])
def test_an_adapter_name_cannot_be_a_path(tmp_path, name):
    """save_pretrained writes adapter "x" to save_directory/x: a name that is an absolute path,
    climbs out or names a sub-folder is refused when the adapter is added."""
    ntk = get_ntk_model(ARCHITECTURES["llama"].build(), NTKConfig())
    with pytest.raises(ValueError, match="adapter names hold 1-128 letters"):
        ntk.add_adapter(name, NTKConfig())
    ntk.add_adapter("fine-tuned 2", NTKConfig())
    ntk.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "fine-tuned 2" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
