"""The adapter on real checkpoints: MiniLM-L6 (BERT, 12 heads, hidden 384) in the normal suite,
SmolLM2-135M (Llama, GQA 9/3, 30 layers) as a slow test. Skipped with the reason when the
offline model package is not installed."""

from __future__ import annotations

import pytest
import torch

from ntk_attention import NTKConfig, NTKModel, get_ntk_model

from support.testing_models import randomize_adapter

SENTENCES = [
    "The adapter keeps a constant-size state for an arbitrarily long prefix.",
    "Short one.",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    transformers = pytest.importorskip("transformers")
    path = minilm_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def load():
        return transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()

    return load, tokenizer


def test_minilm_init_padding_training_and_save_load(minilm, tmp_path):
    load, tokenizer = minilm
    model = load()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # padded row
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    ntk = get_ntk_model(model, NTKConfig())
    assert ntk.get_nb_trainable_parameters()[0] == 6 * 12 * (32 * 32 + 32)
    with torch.no_grad():
        got = ntk(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)

    # One step trains Z and kappa and nothing else.
    ntk.train()
    before = {n: p.detach().clone() for n, p in ntk.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in ntk.parameters() if p.requires_grad], lr=1e-2)
    pooled = ntk(**batch).last_hidden_state[:, 0]
    # Pulling the rows together wants a larger kappa (kappa = 0 is a projected boundary: a loss
    # that wants it smaller, as pushing them apart does here, leaves its gradient at 0).
    loss = -torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)
    loss.backward()
    assert all(p.grad is not None for n, p in ntk.named_parameters() if ".ntk_z." in n)
    assert sum(p.grad.abs().sum() for n, p in ntk.named_parameters() if ".ntk_kappa." in n) > 0
    optimizer.step()
    changed = {n for n, p in ntk.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".ntk_state." in n for n in changed)
    ntk.eval()

    # The padded batch gives each row what it gets alone.
    with torch.no_grad():
        together = ntk(**batch).last_hidden_state
        for row in range(2):
            n = int(batch["attention_mask"][row].sum())
            alone = ntk(**{k: v[row : row + 1, :n] for k, v in batch.items()}).last_hidden_state
            torch.testing.assert_close(together[row, :n], alone[0], rtol=1e-4, atol=1e-5)

    ntk.save_pretrained(tmp_path)
    loaded = NTKModel.from_pretrained(load(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, together)


@pytest.mark.slow
def test_smollm2_gqa_generation_and_save_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    try:
        from ntk_attention.models import smollm2_path

        path = smollm2_path()
    except Exception as err:
        pytest.skip(f"SmolLM2-135M is not available: {err}")
    # Decoders generate from left-padded batches (SmolLM2's tokenizer pads right by default,
    # which would make generate() continue after the pad tokens of the shorter row).
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    batch = tokenizer(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    ntk = get_ntk_model(model, NTKConfig(position_offset=16))
    # 30 layers x 3 KV heads x (64 x 64 + 64)
    assert ntk.get_nb_trainable_parameters()[0] == 30 * 3 * (64 * 64 + 64)
    randomize_adapter(ntk, scale=0.05)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        with ntk.disable_adapter():
            torch.testing.assert_close(ntk(**batch).logits, expected, rtol=0, atol=0)
        cached = ntk.generate(**batch, **settings)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        eos_ids = model.generation_config.eos_token_id
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        for _ in range(8):  # greedy recompute of the whole sequence at every step
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = ntk(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            last = logits[:, -1:].clone()
            last[..., eos_ids] = float("-inf")  # as min_new_tokens does in generate()
            ids = torch.cat([ids, last.argmax(-1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(cached, ids)
    ntk.save_pretrained(tmp_path)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    loaded = NTKModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.generate(**batch, **settings), cached)
