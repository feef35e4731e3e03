"""Feature maps phi for the NTK-Attention state, and the registry that names them.

NTK-Attention replaces the m prefix terms of attention by phi(q)^T Z and phi(q)^T kappa. A
feature map turns a query [..., D] into r non-negative features [..., r]. Each map can also
return its features *in log space*: ``log_forward(x) -> (features * e^{-offset}, offset)`` with
the offset [..., 1] chosen so the scaled features stay O(1). The ops merge that offset with
the log-sum-exp of the exact attention, so maps whose features overflow fp32 (FAVOR+ on real
keys) stay finite.

Registry (``FEATURE_MAPS``), selected by name with :func:`get_feature_map`:

``elu``     phi(x) = ELU(x sqrt(s)) + 1, r = D. The paper's map (x / D^(1/4) at s = 1/sqrt(D)).
            It is *not* a kernel approximation of e^{s x.y}: with it (Z, kappa) are free
            trainable parameters, a linear-attention state.
``favor``   positive random features (FAVOR+, Choromanski et al. 2021):
            phi(x) = exp(W x sqrt(s) - s |x|^2 / 2) / sqrt(r), W [r, D] with orthogonal
            Gaussian blocks, so E[phi(x)^T phi(y)] = e^{s x.y}. Any r.
``exp``     learnable exponential features per KV head: phi(x) = exp(s x.W_i + b_i),
            W [Hkv, r, D], b [Hkv, r] trainable. With these the state *is* r trained virtual
            tokens: kappa_i = 1, b_i = 0, W_i = a prefix key and Z_i = its value reproduce
            prefix attention exactly. Evaluated in log space (never overflows).
``elu+exp`` ELU features (the first D of r) followed by r - D learnable exponential features
            (``exp`` above): a linear-attention state plus r - D trained virtual tokens, e.g. an
            exact attention sink (the prompt's first token). r > D required.
``taylor``  second-order Taylor features of e^{s x.y}:
            phi(x) = [1, sqrt(s) x, s vec(x x^T) / sqrt(2)], r = 1 + D + D^2, so
            phi(x)^T phi(y) = 1 + s x.y + (s x.y)^2 / 2 > 0. Individual features can be negative;
            the kernel value is always positive.

Queries reach a feature map grouped by KV head, shaped [B, Hkv, G * Lq, D], so a map with
per-head parameters can rely on dimension 1 being the KV head.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .constants import constant

__all__ = [
    "FEATURE_MAPS",
    "CallableFeatureMap",
    "EluExpFeatureMap",
    "EluFeatureMap",
    "ExpFeatureMap",
    "ExpFeatureView",
    "FavorFeatureMap",
    "FeatureMap",
    "TaylorFeatureMap",
    "get_feature_map",
]


class FeatureMap(nn.Module):
    """Base class: maps [..., D] to r features [..., r]."""

    r: int

    def __init__(self, head_dim: int, r: int, scale: float | None = None) -> None:
        super().__init__()
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if r <= 0:
            raise ValueError(f"feature dimension r must be positive, got r={r}")
        self.head_dim = head_dim
        self.r = r
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)

    def log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (phi(x) * e^{-offset}, offset) with offset [..., 1]. Default: offset 0."""
        features = self(x)
        return features, torch.zeros_like(features[..., :1])

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, r={self.r}, scale={self.scale:.4g}"


class EluFeatureMap(FeatureMap):
    """phi(x) = ELU(x * sqrt(scale)) + 1 (the paper's map; r = head_dim)."""

    def __init__(self, head_dim: int, r: int | None = None, scale: float | None = None) -> None:
        if r is not None and r != head_dim:
            raise ValueError(f"feature_map 'elu' has r = head_dim = {head_dim}, got r={r}")
        super().__init__(head_dim, head_dim, scale)
        self.multiplier = math.sqrt(self.scale)  # phi(x) = ELU(multiplier x) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ELU(x) + 1 = e^min(x, 0) + relu(x): F.elu(x) + 1 (or aten's one-op elu with scales)
        # computes e^x - 1 + 1 and loses every digit of e^x below the dtype's epsilon (all of
        # them in fp32 at x < -17), which decides the result where the state dominates a row
        # whose features are all that small (the property tests find such rows). The gradient
        # at 0 is 1 (clamp passes it, relu does not); this is 3x faster than torch.where.
        if torch.is_grad_enabled() and x.requires_grad:
            return _EluFeatures.apply(x, self.multiplier)
        return _elu_features(x, self.multiplier)


def _elu_features(x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """ELU(c x) + 1 = e^min(c x, 0) + relu(c x), c = ``multiplier``."""
    x = x * constant(multiplier, x)
    return x.clamp(max=0.0).exp_() + torch.relu(x)  # exp_ on clamp's fresh output


class _EluFeatures(torch.autograd.Function):
    """:func:`_elu_features` with a backward read off its output: with y = c x, phi = e^y for
    y <= 0 and 1 + y above, so d phi / d x = c min(phi, 1) (1 at y = 0, like the clamp's
    gradient). Two ops instead of autograd's six (mul, le, where, threshold, add, mul) on a
    [B, H, L, D] tensor per layer; the backward is made of differentiable ops, so a second
    derivative still works (it is 0 above y = 0 and phi below, as for the composite)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        phi = _elu_features(x, multiplier)
        ctx.save_for_backward(phi)
        ctx.multiplier = multiplier
        return phi

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (phi,) = ctx.saved_tensors
        slope = phi.clamp(max=1.0)
        slope = slope * constant(ctx.multiplier, slope) if ctx.multiplier != 1.0 else slope
        return grad * slope, None


class FavorFeatureMap(FeatureMap):
    """Positive random features: phi(x) = exp(W x sqrt(s) - s|x|^2/2) / sqrt(r).

    W [r, D] is drawn once from ``seed`` (orthogonal Gaussian blocks with chi-distributed row
    norms, as in FAVOR+), stored as a buffer, so the same seed always gives the same map.
    """

    def __init__(
        self, head_dim: int, r: int | None = None, scale: float | None = None, seed: int = 0
    ) -> None:
        r = head_dim if r is None else r
        super().__init__(head_dim, r, scale)
        self.seed = seed
        self.register_buffer("projection", _orthogonal_gaussian(r, head_dim, seed))

    def _log_phi(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        root = math.sqrt(self.scale)
        projected = (x * root) @ self.projection.to(x.dtype).T  # [..., r]
        return projected - 0.5 * self.scale * x.pow(2).sum(-1, keepdim=True) - 0.5 * math.log(
            self.r
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._log_phi(x).exp()

    def log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_phi = self._log_phi(x)
        offset = log_phi.detach().amax(-1, keepdim=True)
        return (log_phi - offset).exp(), offset


class ExpFeatureMap(FeatureMap):
    """Learnable exponential features per KV head: phi(x)_i = exp(s x.W_i + b_i).

    ``weight`` [Hkv, r, D] and ``bias`` [Hkv, r] are parameters; queries arrive as
    [B, Hkv, N, D]. The state (Z, kappa) with these features equals attention over r virtual
    keys W_i with values Z_i / kappa_i and log-weights log kappa_i + b_i: a trained KV prefix.
    ``log_forward`` subtracts the per-query max of the exponent, so nothing overflows.
    """

    def __init__(
        self,
        head_dim: int,
        r: int | None = None,
        scale: float | None = None,
        kv_heads: int = 1,
        seed: int = 0,
    ) -> None:
        if r is None:
            raise ValueError("feature_map 'exp' needs the number of features r")
        super().__init__(head_dim, r, scale)
        if kv_heads <= 0:
            raise ValueError(f"kv_heads must be positive, got {kv_heads}")
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(kv_heads, r, head_dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(kv_heads, r))

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-3] != self.weight.shape[0]:
            raise ValueError(
                f"feature_map 'exp' has {self.weight.shape[0]} KV heads; it expects inputs "
                f"[..., Hkv, N, D], got {tuple(x.shape)}"
            )
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        # [..., Hkv, N, D] x [Hkv, r, D] -> [..., Hkv, N, r]
        return self.scale * (x.to(dtype) @ weight.transpose(-1, -2)) + bias.unsqueeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._exponent(x).exp()

    def log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = self._exponent(x)
        offset = exponent.detach().amax(-1, keepdim=True)
        return (exponent - offset).exp(), offset


class ExpFeatureView(ExpFeatureMap):
    """``exp`` features over given tensors instead of parameters of its own: weight [Hkv, r, D]
    and bias [Hkv, r] (entries of -inf give phi = 0). Built per call, e.g. by the adapter to
    join kept prompt tokens to the trained virtual tokens; gradients flow to the tensors."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: float) -> None:
        FeatureMap.__init__(self, weight.shape[-1], weight.shape[-2], scale)
        if bias.shape != weight.shape[:-1]:
            raise ValueError(
                f"bias must be [Hkv, r] = {tuple(weight.shape[:-1])}, got {tuple(bias.shape)}"
            )
        # plain attributes (not parameters): this view owns nothing
        self.__dict__["weight"], self.__dict__["bias"] = weight, bias


class EluExpFeatureMap(FeatureMap):
    """``elu`` features followed by ``exp`` features: phi(x) = [ELU(x sqrt(s)) + 1, exp(s x.W + b)].

    r = D + n: the first D features are the paper's linear-attention map, the last n are
    per-KV-head learnable exponential features (``exp.weight`` [Hkv, n, D], ``exp.bias``
    [Hkv, n]), i.e. n virtual tokens. With W_i = a real key, b_i = 0, kappa_i = 1 and Z_i its
    value, token i is kept exactly (an attention sink) beside a linear-attention state.
    ``log_forward`` shares one offset, max(0, largest exponent), between both parts.
    """

    def __init__(
        self,
        head_dim: int,
        r: int | None = None,
        scale: float | None = None,
        kv_heads: int = 1,
        seed: int = 0,
    ) -> None:
        if r is None or r <= head_dim:
            raise ValueError(
                f"feature_map 'elu+exp' has r = head_dim + n exponential features, so it needs "
                f"r > head_dim = {head_dim}, got r={r}"
            )
        super().__init__(head_dim, r, scale)
        self.elu = EluFeatureMap(head_dim, scale=self.scale)
        self.exp = ExpFeatureMap(head_dim, r - head_dim, self.scale, kv_heads=kv_heads, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exp_part = self.exp(x)
        return torch.cat([self.elu(x.to(exp_part.dtype)), exp_part], dim=-1)

    def log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = self.exp._exponent(x)
        offset = exponent.detach().amax(-1, keepdim=True).clamp_min_(0.0)
        elu_part = self.elu(x.to(exponent.dtype)) * torch.exp(-offset)
        return torch.cat([elu_part, (exponent - offset).exp()], dim=-1), offset


class TaylorFeatureMap(FeatureMap):
    """phi(x) = [1, sqrt(s) x, s vec(x x^T) / sqrt(2)]; r = 1 + D + D^2."""

    def __init__(self, head_dim: int, r: int | None = None, scale: float | None = None) -> None:
        full = 1 + head_dim + head_dim * head_dim
        if r is not None and r != full:
            raise ValueError(
                f"feature_map 'taylor' has r = 1 + D + D^2 = {full} for head_dim={head_dim}, "
                f"got r={r}"
            )
        super().__init__(head_dim, full, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        root = math.sqrt(self.scale)
        first = x * root
        second = (first.unsqueeze(-1) * first.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), first, second], dim=-1)


class CallableFeatureMap(FeatureMap):
    """Wraps any callable [..., D] -> [..., r] with non-negative output."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], head_dim: int, r: int) -> None:
        super().__init__(head_dim, r)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "elu": EluFeatureMap,
    "elu+exp": EluExpFeatureMap,
    "exp": ExpFeatureMap,
    "favor": FavorFeatureMap,
    "taylor": TaylorFeatureMap,
}


def get_feature_map(
    feature_map: str | FeatureMap | Callable[[torch.Tensor], torch.Tensor],
    head_dim: int,
    r: int | None = None,
    scale: float | None = None,
    seed: int = 0,
    kv_heads: int = 1,
) -> FeatureMap:
    """Build (or pass through) a feature map for queries/keys of size ``head_dim``.

    ``feature_map`` is a registry name, a :class:`FeatureMap` (returned as is), or a callable
    with non-negative output of size ``r`` (``r`` required then). ``kv_heads`` sizes maps
    with per-head parameters (``exp``); ``seed`` fixes random ones (``favor``, ``exp``).
    """
    if r is not None and r <= 0:
        raise ValueError(f"feature dimension r must be positive, got r={r}")
    if isinstance(feature_map, FeatureMap):
        if feature_map.head_dim != head_dim:
            raise ValueError(
                f"feature_map was built for head_dim={feature_map.head_dim}, "
                f"but the queries have head_dim={head_dim}"
            )
        if r is not None and feature_map.r != r:
            raise ValueError(f"feature_map has r={feature_map.r}, but the state has r={r}")
        return feature_map
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} "
                "or a callable"
            )
        cls = FEATURE_MAPS[feature_map]
        kwargs = {}
        if cls in (FavorFeatureMap, ExpFeatureMap, EluExpFeatureMap):
            kwargs["seed"] = seed
        if cls in (ExpFeatureMap, EluExpFeatureMap):
            kwargs["kv_heads"] = kv_heads
        return cls(head_dim, r=r, scale=scale, **kwargs)
    if callable(feature_map):
        if r is None:
            raise ValueError("a callable feature_map needs the feature dimension r")
        return CallableFeatureMap(feature_map, head_dim, r)
    raise ValueError(
        f"feature_map must be a name in {sorted(FEATURE_MAPS)}, a FeatureMap or a callable, "
        f"got {type(feature_map).__name__}"
    )


def _orthogonal_gaussian(rows: int, dim: int, seed: int) -> torch.Tensor:
    """[rows, dim] Gaussian matrix whose blocks of ``dim`` rows are orthogonal (FAVOR+)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for start in range(0, rows, dim):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, upper = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(upper))  # Haar-uniform: undo QR's sign convention
        blocks.append(q.T[: min(dim, rows - start)])
    norms = torch.randn(rows, dim, generator=generator, dtype=torch.float64).norm(dim=-1)
    return (torch.cat(blocks) * norms.unsqueeze(-1)).float()
