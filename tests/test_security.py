"""SECURITY.md's claims, checked: no pickle is read or written (safetensors and JSON only;
torch.load only with weights_only=True), remote code runs only with --trust-remote-code, and
writes are atomic (tests/test_crash_safety.py kills real saves)."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.train.checkpoint import save_checkpoint
from ntk_attention.train.config import RunError, TrainConfig
from ntk_attention.train.prepare import prepare

from support.testing_models import ARCHITECTURES

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


def _dotted(node: ast.expr) -> str | None:
    """"a.b.c" for the expression a.b.c, None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _unsafe_torch_loads(tree: ast.AST) -> list[int]:
    """Lines of the calls of torch.load in ``tree`` without a literal ``weights_only=True``,
    however it is spelled: ``torch.load``, ``torch.serialization.load``, under an alias of the
    module (``import torch as t``) or imported by name (``from torch import load as f``)."""
    torch_modules = {"torch": "torch", "torch.serialization": "torch.serialization"}
    load_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("torch", "torch.serialization") and alias.asname:
                    torch_modules[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            for alias in node.names:
                if alias.name == "load":
                    load_names.add(alias.asname or "load")
                elif alias.name == "serialization":
                    torch_modules[alias.asname or "serialization"] = "torch.serialization"
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            is_torch_load = func.id in load_names
        elif isinstance(func, ast.Attribute) and func.attr == "load":
            is_torch_load = torch_modules.get(_dotted(func.value) or "") is not None
        else:
            is_torch_load = False
        value = _keyword(node, "weights_only")
        if is_torch_load and not (isinstance(value, ast.Constant) and value.value is True):
            lines.append(node.lineno)
    return lines


def test_no_pickle_and_torch_load_only_with_weights_only():
    for file in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), file
    unsafe = [f"{file}:{line}" for file in sorted(SOURCE.rglob("*.py"))
              for line in _unsafe_torch_loads(ast.parse(file.read_text(), filename=str(file)))]
    assert unsafe == [], f"torch.load without weights_only=True at {unsafe}"


UNSAFE_LOADS = {
    "import torch\ntorch.load(p)": [2],
    "import torch\ntorch.load(p, weights_only=False)": [2],
    "import torch\ntorch.load(p, weights_only=flag)": [2],
    "import torch as t\nt.load(p)": [2],
    "import torch.serialization\ntorch.serialization.load(p)": [2],
    "from torch import serialization as s\ns.load(p)": [2],
    "from torch import load\nload(p)": [2],
    "from torch.serialization import load as read\nread(p)": [2],
    "import torch\ntorch.load(p, weights_only=True)\ntorch.load(q)": [3],
    "import torch\ntorch.load(p, weights_only=True)": [],
    "import json\njson.load(f)": [],
    "import safetensors.torch\nsafetensors.torch.load_file(p)": [],
}


@pytest.mark.parametrize("source", UNSAFE_LOADS)
def test_the_torch_load_check_finds_every_spelling_of_an_unsafe_load(source):
    """The package holds no torch.load at all, so the check above passes on nothing: here it
    must find the unsafe calls in sources that have them (and only those)."""
    assert _unsafe_torch_loads(ast.parse(source)) == UNSAFE_LOADS[source]


class _Payload:
    """Unpickling this creates ``path``: code that runs when a pickle is loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_in_place_of_saved_tensors_is_refused_without_running_it(tmp_path):
    """A pickle with a payload, named as an adapter's or a checkpoint's safetensors file: the
    load fails and the payload never runs (torch.load without weights_only would run it)."""
    from ntk_attention import NTKModel
    from ntk_attention.train.checkpoint import CheckpointError, load_checkpoint
    from ntk_attention.tuner import AdapterLoadError

    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    torch.save({"weights": _Payload(marker)}, payload)
    torch.load(payload, weights_only=False)  # the payload is live: unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(payload, weights_only=True)
    assert not marker.exists()

    model = get_ntk_model(ARCHITECTURES["llama"].build(), NTKConfig())
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(payload.read_bytes())
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        NTKModel.from_pretrained(ARCHITECTURES["llama"].build(), tmp_path / "adapter")
    assert not marker.exists()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler)
    checkpoint = save_checkpoint(tmp_path / "checkpoints", step=1, trainer_state={}, **state)
    (checkpoint / "model.safetensors").write_bytes(payload.read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        load_checkpoint(checkpoint, **state)
    assert not marker.exists()


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


def test_a_model_with_remote_code_is_refused_without_the_flag(tmp_path, minilm_tokenizer):
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
    minilm_tokenizer.save_pretrained(model)  # so that loading reaches the model's config
    config = TrainConfig(task="bbc-news", method="ntk", model=str(model), max_train=4, max_eval=4)
    assert config.trust_remote_code is False
    with pytest.raises(RunError, match=rf"--model {model} ships its own Python code, which runs only with --trust-remote-code"):
        prepare(config)
    assert not marker.exists()


def test_the_cli_flag_reaches_the_config():
    from ntk_attention.cli import build_parser
    from ntk_attention.cli.finetune import config_from

    base = ["finetune", "--task", "bbc-news", "--method", "ntk"]
    assert config_from(build_parser().parse_args(base)).trust_remote_code is False
    assert config_from(build_parser().parse_args([*base, "--trust-remote-code"])).trust_remote_code


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
