"""Kept prompt tokens stored in a few bits: the keys and values an exact (retrieval) head keeps,
quantised as KIVI does a KV cache (Liu et al. 2024, arXiv 2402.02750): keys per channel over
groups of ``GROUP`` tokens (a key's outliers sit in fixed channels), values per token over
groups of ``GROUP`` channels.

Asymmetric uniform quantisation of one group x_1..x_G to b bits (q_max = 2^b - 1):

    lo = min_i x_i,   step = (max_i x_i - lo) / q_max,   q_i = round((x_i - lo) / step)
    x_i ~= lo + step q_i          (error <= step / 2 per number)

Codes of b < 8 bits are packed 8 / b to a byte along the grouped axis; each group stores
(lo, step) as floats. A group that runs past the end of the axis is padded with copies of its
last number (so the padding does not widen its range) and the padding is dropped on the way
back.

Size, as compression counts it (``stored_numbers``): a float is one number and a byte of codes
half of one, i.e. every float counted as 16 bits (a bf16/fp16 KV cache), the less favourable
reading for the codes (against a float32 cache they would count half as much again). With
b = 4, D = 64, GROUP = 32 one kept token costs 2 x 64 x 4 / 16 = 32 numbers of codes plus
2 x 2 x 64 / 32 + 2 x 2 x 64 / 32 = 8 of ranges: 40 numbers, 0.31 of the 128 a float token
keeps.

Written here rather than taken from torchao (whose ``quantize_affine`` does the same
arithmetic): the ~30 lines below are the whole need, and importing torchao costs ~4 s and
prints load failures of its CUDA kernels on a CPU machine, for every user of the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BITS", "GROUP", "QuantizedTokens", "check_bits", "stored_numbers", "token_numbers"]

BITS = (2, 4, 8)
GROUP = 32


def check_bits(bits: object, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` naming the problem unless ``bits`` is None (float) or one of BITS."""
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise error(f"exact_bits must be one of {BITS} or None, got {bits!r}")


def _grouped(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with ``dim`` moved last and cut into groups: [..., groups, GROUP] (edge-padded)."""
    x = x.movedim(dim, -1)
    pad = (-x.shape[-1]) % GROUP
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.unflatten(-1, (-1, GROUP))


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [..., groups x GROUP x bits / 8] with ``dim`` moved last, ranges float
    [..., groups, 2] holding (lo, step)) of ``x`` quantised over groups along ``dim``."""
    groups = _grouped(x.float(), dim)
    lo = groups.amin(-1, keepdim=True)
    step = (groups.amax(-1, keepdim=True) - lo) / (2**bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: any step
    codes = ((groups - lo) / step).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    codes = codes.flatten(-2)
    per_byte = 8 // bits
    if per_byte > 1:  # pack: code j of each run of per_byte goes to bits [j*b, (j+1)*b)
        runs = codes.unflatten(-1, (-1, per_byte))
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=x.device) * bits
        codes = (runs << shifts).sum(-1, dtype=torch.uint8)
    return codes, torch.cat([lo, step], dim=-1)


def dequantize(
    codes: torch.Tensor, ranges: torch.Tensor, bits: int, dim: int, length: int
) -> torch.Tensor:
    """The numbers :func:`quantize` coded, ``dim`` moved back and ``length`` long along it."""
    per_byte = 8 // bits
    if per_byte > 1:
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
        codes = ((codes.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)
    groups = codes.unflatten(-1, (-1, GROUP)).to(ranges.dtype)
    x = (ranges[..., :1] + ranges[..., 1:] * groups).flatten(-2)[..., :length]
    return x.movedim(-1, dim)


def token_numbers(tokens: int, head_dim: int, bits: int | None) -> int:
    """Numbers one head stores to keep ``tokens`` tokens (keys and values), as counted by
    :func:`stored_numbers`: 2 x tokens x head_dim floats, or codes and ranges at ``bits``."""
    if bits is None:
        return 2 * tokens * head_dim

    def one(length: int, other: int) -> int:  # grouped along length, one range per group
        groups = -(-length // GROUP)
        return other * groups * GROUP * bits // 16 + 2 * other * groups

    return one(tokens, head_dim) + one(head_dim, tokens)


def stored_numbers(tensor: torch.Tensor) -> float:
    """How many numbers a stored tensor counts as: a float (or any non-integer) one each, an
    integer code byte half of one (module docstring)."""
    if tensor.dtype == torch.uint8:
        return tensor.numel() / 2
    return float(tensor.numel())


class QuantizedTokens(nn.Module):
    """Keys and values [n, T, D] of n heads kept at ``bits`` bits (buffers, not trained):
    keys per channel over token groups, values per token over channel groups."""

    def __init__(self, heads: int, tokens: int, head_dim: int, bits: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if bits is None:
            raise ValueError(f"QuantizedTokens needs bits, one of {BITS}; float tokens are Parameters")
        check_bits(bits)
        self.bits, self.tokens, self.head_dim = bits, tokens, head_dim
        zeros = torch.zeros(heads, tokens, head_dim, device=device)
        self.register_buffer("key_codes", None)
        self.register_buffer("key_ranges", None)
        self.register_buffer("value_codes", None)
        self.register_buffer("value_ranges", None)
        self.set(keys=zeros, values=zeros)

    def set(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        """Quantise and store new keys and/or values [n, T, D] (the others stay)."""
        for name, x, dim in (("key", keys, 1), ("value", values, 2)):
            if x is None:
                continue
            if tuple(x.shape[1:]) != (self.tokens, self.head_dim):
                raise ValueError(
                    f"{name}s must be [n, {self.tokens}, {self.head_dim}], got {tuple(x.shape)}"
                )
            codes, ranges = quantize(x.detach(), self.bits, dim)
            old = getattr(self, f"{name}_ranges")
            if old is not None:  # keep the stored float dtype (e.g. after model.to(bf16))
                ranges = ranges.to(old.dtype)
            setattr(self, f"{name}_codes", codes)
            setattr(self, f"{name}_ranges", ranges)

    def keys(self) -> torch.Tensor:
        """The kept keys [n, T, D], dequantised (in the ranges' dtype)."""
        return dequantize(self.key_codes, self.key_ranges, self.bits, 1, self.tokens)

    def values(self) -> torch.Tensor:
        """The kept values [n, T, D], dequantised."""
        return dequantize(self.value_codes, self.value_ranges, self.bits, 2, self.head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.key_codes.shape[0]}, tokens={self.tokens}, bits={self.bits}"
