"""The Hub, without a network: push_to_hub uploads the adapter's files and a model card (never
the base model), and from_pretrained resolves "owner/name" through huggingface_hub's cache laid
out as the client lays it (offline), with one-line errors for what is not there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ntk_attention import NTKConfig, NTKModel, get_ntk_model
from ntk_attention.tuner import AdapterLoadError

from support.testing_models import ARCHITECTURES, randomize_adapter

SPEC = ARCHITECTURES["llama"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread."""


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub reads offline; ``publish(repo, folder)`` lays a
    folder out in it as a download would (blobs, a snapshot of links, refs/main)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, folder: Path, commit: str = "0" * 40) -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir()
        for index, file in enumerate(sorted(folder.iterdir())):
            blob = repo / "blobs" / f"{index:040x}"
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)

    return publish


def _trained():
    ntk = get_ntk_model(SPEC.build(), NTKConfig())
    randomize_adapter(ntk)
    return ntk


def test_push_to_hub_uploads_the_adapter_and_a_card_and_it_loads_back(tmp_path, monkeypatch, offline_cache):
    from huggingface_hub import HfApi

    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        uploads["created"] = repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / "uploaded"
        shutil.copytree(folder_path, copy)
        uploads["folder"] = copy
        return "https://huggingface.co/user/tiny-ntk/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    ntk = _trained()
    url = ntk.push_to_hub("user/tiny-ntk", metrics={"test_loss": 1.23})
    assert url.endswith("/commit/0") and uploads["created"] == "user/tiny-ntk"
    files = sorted(p.name for p in uploads["folder"].iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (uploads["folder"] / "README.md").read_text()
    assert "library_name: ntk-attention" in card and "test_loss" in card and '"sink_tokens"' in card
    # a small upload: the state, not the base model
    assert (uploads["folder"] / "adapter_model.safetensors").stat().st_size < 50_000

    offline_cache("user/tiny-ntk", uploads["folder"])
    loaded = NTKModel.from_pretrained(SPEC.build(), "user/tiny-ntk")
    batch = SPEC.inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ntk(**batch).logits)


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("user/not-cached", "not in the Hugging Face cache while offline"),
        ("a/b/c", "no adapter_config.json in a/b/c"),
        ("/no/such/folder", "no adapter_config.json in /no/such/folder"),
    ],
)
def test_what_cannot_be_resolved_is_named(offline_cache, model_id, message):
    with pytest.raises(AdapterLoadError, match=message):
        NTKModel.from_pretrained(SPEC.build(), model_id)


def test_a_cached_repository_without_the_adapter_files_is_named(tmp_path, offline_cache):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    offline_cache("user/a-model", folder)
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        NTKModel.from_pretrained(SPEC.build(), "user/a-model")


def test_push_to_hub_refuses_a_bad_repo_id():
    with pytest.raises(ValueError, match="repo_id must be a Hub repository id"):
        _trained().push_to_hub("a/b/c")


def test_peft_loaders_name_the_ntk_loader_for_an_ntk_folder(tmp_path):
    """PEFT given an NTK-Attention folder: one clear ValueError instead of KeyError."""
    from peft import PeftConfig, PeftModel

    _trained().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"NTKModel.from_pretrained\(base_model, path\)"):
        PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"NTKModel.from_pretrained\(base_model, path\)"):
        PeftModel.from_pretrained(SPEC.build(), str(tmp_path))


def test_our_loader_names_peft_for_a_peft_folder(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(SPEC.build(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"'LORA' adapter.*PeftModel.from_pretrained"):
        NTKModel.from_pretrained(SPEC.build(), tmp_path)
