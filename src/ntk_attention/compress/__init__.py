"""Compress a long prompt, or convert a trained PEFT prefix, into a small *trained*
NTK-Attention state (closed form is an initialisation, not a conversion: docs/results/REPORT.md section 5).

    compress_prompt(model, tokenizer, prompt)    prompt.py (chat=True: an instruct model's
                                                 system prompt, later turns through
                                                 chat.turns_after_system_ids)
    exact_prompt_state(model, prompt_ids)        prompt.py (the prompt's cache as a state, exactly)
    convert_prefix(adapter_dir, base_model)      peft_prefix.py
    CompressConfig                               config.py (state size, init, distillation)

Inside: teacher.py (the prefix in the model's cache, sampled inputs, per-layer capture, the
retrieval scores that choose the heads keeping every prompt token exactly),
token_selection.py (which prompt tokens to keep: by attention mass, sink + recent, SnapKV), initial_state.py
(sizing to a memory budget, initialisation), distill.py (layer-wise and end-to-end).
"""

from .chat import system_prompt_ids, turns_after_system_ids
from .config import CompressConfig, CompressError
from .peft_prefix import convert_prefix, read_peft_prefix
from .prompt import CompressionReport, compress_prompt, exact_prompt_state

__all__ = [
    "CompressConfig",
    "CompressError",
    "CompressionReport",
    "compress_prompt",
    "convert_prefix",
    "exact_prompt_state",
    "read_peft_prefix",
    "system_prompt_ids",
    "turns_after_system_ids",
]
