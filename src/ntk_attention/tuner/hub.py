"""The Hugging Face Hub: an adapter pushed as its own files with a model card, and Hub ids
resolved to local folders (through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` reads what
is cached and never downloads).

Hand-written only where the Hub client has no notion of this adapter: which files make it
(``save_pretrained``'s two files) and what its model card says. Transfers, caching, revisions
and authentication are huggingface_hub's.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .save_load import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError

if TYPE_CHECKING:
    from .model import NTKModel

__all__ = ["model_card", "push_adapter", "resolve_adapter_dir"]

# "owner/name" (or "name"): what the Hub accepts as a model repository id.
_REPO_ID = re.compile(r"(?:[\w.\-]+/)?[\w.\-]+")


def _is_repo_id(text: object) -> bool:
    return isinstance(text, str) and _REPO_ID.fullmatch(text) is not None


def resolve_adapter_dir(model_id: str | os.PathLike, revision: str | None = None) -> Path:
    """``model_id`` as a local folder: itself when it is one (or cannot be a repository id),
    else a Hub repository id fetched (adapter files only) into huggingface_hub's cache, or read
    from it when offline. Errors are :class:`AdapterLoadError` naming the repository and what
    is missing."""
    path = Path(model_id)
    text = str(model_id)
    if path.is_dir() or not _is_repo_id(text):
        return path  # a folder, or a path that is no repository id: the loader says what is missing
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            text, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            library_name="ntk-attention",
        )
    except LocalEntryNotFoundError:
        raise AdapterLoadError(
            f"{text!r}: not a local folder, and not in the Hugging Face cache while offline "
            "(HF_HUB_OFFLINE=1 or no network): download it once online, or pass a folder"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise AdapterLoadError(f"{text!r}: no such repository or revision on the Hub "
                               f"({type(error).__name__})") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterLoadError(f"{text!r}: the Hub did not give its adapter files: {first}") from None
    return Path(folder)


def model_card(ntk: NTKModel, adapter_name: str, metrics: dict[str, Any] | None = None) -> str:
    """A README.md for the Hub: base model, method, the adapter's config and, if given, metrics."""
    config = ntk.peft_config[adapter_name]
    base = ntk._base_record(config)
    base_name = base.get("name_or_path") or base.get("architecture") or "unknown"
    lines = [
        "---",
        f"base_model: {base_name}",
        "library_name: ntk-attention",
        "tags:",
        "- ntk-attention",
        "- peft",
        "- prefix-tuning",
        "---",
        "",
        f"# NTK-Attention adapter for {base_name}",
        "",
        "An NTK-Attention state (Z, kappa) per attention layer and KV head: the effect of a long",
        "attention prefix in a constant-size state (arXiv 2406.14036). Load it with",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM  # or the base model's Auto class",
        "from ntk_attention import NTKModel",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base_name!r})",
        "model = NTKModel.from_pretrained(base, \"<this repository>\")",
        "```",
        "",
        "It is not a PEFT adapter: `peft.PeftModel.from_pretrained` cannot load it.",
        "",
        f"Base model: `{base_name}` ({base.get('architecture')}, "
        f"{base.get('attention_layers')} attention layers).",
        "",
        "Adapter config:",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2, sort_keys=True),
        "```",
    ]
    if metrics:
        lines += ["", "Metrics:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def push_adapter(
    ntk: NTKModel,
    repo_id: str,
    *,
    adapter_name: str = "default",
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload NTK-Attention adapter",
    metrics: dict[str, Any] | None = None,
) -> str:
    """Upload adapter ``adapter_name`` (its two files) and a model card to the Hub repository
    ``repo_id`` (created if missing); returns the commit URL. Nothing of the base model is
    uploaded."""
    if adapter_name not in ntk.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; known: {sorted(ntk.peft_config)}")
    if not _is_repo_id(repo_id):
        raise ValueError(f"repo_id must be a Hub repository id ('owner/name'), got {repo_id!r}")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as folder:
        ntk.save_pretrained(folder, selected_adapters=[adapter_name])
        if adapter_name != "default":  # save_pretrained puts a named adapter in a sub-folder
            folder = str(Path(folder) / adapter_name)
        (Path(folder) / "README.md").write_text(model_card(ntk, adapter_name, metrics))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model"
        )
    return str(getattr(commit, "commit_url", commit))
