"""Tiny random transformers models for tests: one entry per architecture.

Every entry builds a 2-layer model (hidden 32, 4 heads; KV heads < heads where the
architecture has GQA) with a fixed seed, and makes inputs of the right kind. A new architecture
is one line in ``ARCHITECTURES``.

    arch = ARCHITECTURES["llama"]
    model = arch.build()                       # attn_implementation="sdpa", eval mode
    batch = arch.inputs(batch=2, length=7)     # input_ids + attention_mask (or pixel_values)
    tokenizer = char_tokenizer()               # one id per character, fits the decoders' vocab
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers

__all__ = ["ARCHITECTURES", "TinyArchitecture", "char_tokenizer", "randomize_adapter"]

VOCAB = 97
IMAGE = 16


def _decoder(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )


def _encoder(**extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )


def _vision(**extra: Any) -> dict[str, Any]:
    return dict(
        image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **extra,
    )


@dataclasses.dataclass(frozen=True)
class TinyArchitecture:
    """How to build one tiny model and its inputs.

    kind: "decoder" (causal LM: generate, position ids), "encoder" (text classifier) or
    "vision" (image classifier). ``head``: the task head's module name (for modules_to_save).
    """

    name: str
    model_class: str
    config_class: str
    config: dict[str, Any]
    kind: str
    head: str | None = None

    def build(self, attn_implementation: str = "sdpa", seed: int = 0) -> transformers.PreTrainedModel:
        config = getattr(transformers, self.config_class)(**self.config)
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = getattr(transformers, self.model_class)(config)
        return model.eval()

    @property
    def has_positions(self) -> bool:
        """Takes position ids (rotary or learned), so position_offset applies."""
        return self.kind != "vision"

    def inputs(
        self, batch: int = 2, length: int = 7, seed: int = 0, pad: int = 0, side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """A batch; with ``pad`` > 0 the last row has ``pad`` padding tokens on ``side``."""
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)}
        input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            cols = slice(length - pad, length) if side == "right" else slice(0, pad)
            attention_mask[-1, cols] = 0
            input_ids[-1, cols] = 0
        return {"input_ids": input_ids, "attention_mask": attention_mask}


ARCHITECTURES: dict[str, TinyArchitecture] = {
    arch.name: arch
    for arch in (
        TinyArchitecture("llama", "LlamaForCausalLM", "LlamaConfig", _decoder(), "decoder"),
        TinyArchitecture("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _decoder(), "decoder"),
        TinyArchitecture(
            "mistral", "MistralForCausalLM", "MistralConfig", _decoder(sliding_window=5), "decoder"
        ),
        TinyArchitecture(
            "gemma", "GemmaForCausalLM", "GemmaConfig",
            {**_decoder(head_dim=8), "num_key_value_heads": 1}, "decoder",
        ),
        TinyArchitecture(
            "gpt2", "GPT2LMHeadModel", "GPT2Config",
            dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0),
            "decoder",
        ),
        TinyArchitecture("bert", "BertForSequenceClassification", "BertConfig", _encoder(), "encoder", "classifier"),
        TinyArchitecture(
            "roberta", "RobertaForSequenceClassification", "RobertaConfig",
            _encoder(pad_token_id=1), "encoder", "classifier",
        ),
        TinyArchitecture("vit", "ViTForImageClassification", "ViTConfig", _vision(), "vision", "classifier"),
        TinyArchitecture(
            "dinov2", "Dinov2ForImageClassification", "Dinov2Config",
            {**_vision(), "mlp_ratio": 2}, "vision", "classifier",
        ),
    )
}


def randomize_adapter(
    model: torch.nn.Module, adapter_name: str = "default", seed: int = 0, scale: float = 1.0
) -> None:
    """Give an adapter a non-trivial state (as if trained): Z ~ N(0, scale^2), theta ~ |N(0, 1)|
    (kappa > 0), low-rank factors likewise. For tests that need a state that changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if adapter_name not in parts or not any(p.startswith("ntk_") for p in parts):
                continue
            if parts[-2] == "ntk_kappa":
                value = torch.randn(param.shape, generator=generator).abs()
            elif parts[-2] in ("ntk_z", "ntk_z_a", "ntk_z_b"):
                value = torch.randn(param.shape, generator=generator) * scale
            else:
                continue
            param.copy_(value.to(param))


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The smallest real tokenizer: one token per printable ASCII character (" " to "}" are ids
    3..96, anything else is <unk> = <pad> = 0), <s> = 1 and </s> = 2, fitting the tiny decoders'
    vocabulary. No special tokens are added, so ``len(tokenizer(text)["input_ids"]) ==
    len(text)``; it saves with ``save_pretrained`` for commands that take a model directory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): 3 + i for i in range(VOCAB - 3)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<pad>",
    )
