"""Test-wide fixtures: a fixed seed per test, and NaN-filled fresh tensors (deterministic mode
fills ``torch.empty`` with NaN, so an output an op forgot to write cannot pass by accident),
and a derandomized hypothesis profile under CI (a red run must be reproducible; locally
hypothesis keeps exploring new examples and stores the failures it finds); a tiny decoder
saved as a model directory with a real tokenizer, for commands that take ``--model``."""

import json
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_and_nan_fill():
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def single_thread():
    """One intra-op thread, for modules of tiny tensors: on a shared 2-core machine a busy
    neighbour made OpenMP's spinning threads ~50x slower per op (24 ms vs 0.5 ms measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_decoder_dir(tmp_path):
    """A 2-layer Llama with MiniLM's tokenizer, saved as a model directory."""
    transformers = pytest.importorskip("transformers")
    try:
        from ntk_attention.models import minilm_path

        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    except Exception as err:
        pytest.skip(f"MiniLM's tokenizer is not installed offline: {err}")
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = tmp_path / "lm.jsonl"
    rows = [{"text": f"the {word} sat on the mat number {i}"} for i, word in enumerate(["cat", "dog"] * 12)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path, data
