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

What a map can do is stated on its class (``FEATURE_MAPS[name].trainable`` and so on: see
:class:`FeatureMap`), so the ops, the adapter's config and prompt compression ask the class
instead of comparing names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

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
    """Base class: maps [..., D] to r features [..., r].

    The features are laid out as k leading *kernel features* (a fixed function of x: ELU,
    FAVOR+, Taylor; their state over keys has the closed form sum_i phi(k_i) v_i^T) followed by
    r - k *virtual tokens* exp(s x.W_i + b_i) with trainable keys W [Hkv, n, D] and biases
    b [Hkv, n] (:meth:`virtual_token_tensors`). What a class can do, read through the registry
    (``FEATURE_MAPS[name].needs_r``) by the ops, NTKConfig and prompt compression, follows.
    """

    r: int

    #: Has parameters of its own: a name alone does not say what the map is (the ops refuse
    #: the name and want the module).
    trainable: ClassVar[bool] = False
    #: Has no natural feature dimension: r must be given (:meth:`resolve_r` raises without it).
    needs_r: ClassVar[bool] = False
    #: r is set by the head dim alone (:meth:`resolve_r` refuses any other r).
    fixed_r: ClassVar[bool] = False
    #: Some features are kernel features (a fixed function of x, closed form over keys).
    has_kernel_features: ClassVar[bool] = True
    #: Some features are virtual tokens exp(s x.W_i + b_i) (:meth:`virtual_token_tensors`).
    has_virtual_tokens: ClassVar[bool] = False
    #: Registry name of this map with virtual tokens appended (elu -> "elu+exp"), or None.
    virtual_token_variant: ClassVar[str | None] = None

    def __init__(self, head_dim: int, r: int, scale: float | None = None) -> None:
        super().__init__()
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if r <= 0:
            raise ValueError(f"feature dimension r must be positive, got r={r}")
        self.head_dim = head_dim
        self.r = r
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)

    @classmethod
    def resolve_r(
        cls, head_dim: int, r: int | None = None, *, head_dim_name: str = "head_dim"
    ) -> int:
        """The feature dimension the constructor gives this map for ``head_dim`` when asked for
        ``r`` (None: the natural r); raises the constructor's ValueError for an r it refuses.
        ``head_dim_name`` is how the message names the head dim. That head_dim and r are
        positive is checked by FeatureMap's constructor, not here."""
        if r is None:
            raise ValueError(f"feature_map {cls.__name__} needs the feature dimension r")
        return r

    @classmethod
    def only_virtual_tokens(cls) -> bool:
        """Every feature is a virtual token (no kernel features): the state *is* attention over
        r trained tokens, so a token can be copied in (or joined as one more feature) exactly."""
        return cls.has_virtual_tokens and not cls.has_kernel_features

    @classmethod
    def virtual_token_slots(cls, head_dim: int, r: int) -> range:
        """Which of the r features are virtual tokens (the kernel features come before them);
        empty for a map without any."""
        return range(r, r)

    def kernel_map(self) -> FeatureMap | None:
        """The module that computes the leading kernel features (``self`` when every feature
        is one), or None when there are none."""
        return self if self.has_kernel_features else None

    def virtual_token_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The virtual tokens' keys W [Hkv, n, D] and biases b [Hkv, n] (the tensors the map
        reads, not copies), or None for a map without virtual tokens."""
        return None

    def log_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (phi(x) * e^{-offset}, offset) with offset [..., 1]. Default: offset 0."""
        features = self(x)
        return features, torch.zeros_like(features[..., :1])

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, r={self.r}, scale={self.scale:.4g}"


class EluFeatureMap(FeatureMap):
    """phi(x) = ELU(x * sqrt(scale)) + 1 (the paper's map; r = head_dim)."""

    fixed_r = True
    virtual_token_variant = "elu+exp"

    def __init__(self, head_dim: int, r: int | None = None, scale: float | None = None) -> None:
        super().__init__(head_dim, type(self).resolve_r(head_dim, r), scale)
        self.multiplier = math.sqrt(self.scale)  # phi(x) = ELU(multiplier x) + 1

    @classmethod
    def resolve_r(
        cls, head_dim: int, r: int | None = None, *, head_dim_name: str = "head_dim"
    ) -> int:
        if r is not None and r != head_dim:
            raise ValueError(
                f"feature_map 'elu' has r = {head_dim_name} = {head_dim}, got r={r} "
                "(use feature_map='favor' or 'exp' for another r)"
            )
        return head_dim

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
        r = type(self).resolve_r(head_dim, r)
        super().__init__(head_dim, r, scale)
        self.seed = seed
        self.register_buffer("projection", _orthogonal_gaussian(r, head_dim, seed))

    @classmethod
    def resolve_r(
        cls, head_dim: int, r: int | None = None, *, head_dim_name: str = "head_dim"
    ) -> int:
        return head_dim if r is None else r

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

    trainable = True
    needs_r = True
    has_kernel_features = False
    has_virtual_tokens = True

    def __init__(
        self,
        head_dim: int,
        r: int | None = None,
        scale: float | None = None,
        kv_heads: int = 1,
        seed: int = 0,
    ) -> None:
        r = type(self).resolve_r(head_dim, r)
        super().__init__(head_dim, r, scale)
        if kv_heads <= 0:
            raise ValueError(f"kv_heads must be positive, got {kv_heads}")
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(kv_heads, r, head_dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(kv_heads, r))

    @classmethod
    def resolve_r(
        cls, head_dim: int, r: int | None = None, *, head_dim_name: str = "head_dim"
    ) -> int:
        if r is None:
            raise ValueError("feature_map 'exp' needs the number of features r")
        return r

    @classmethod
    def virtual_token_slots(cls, head_dim: int, r: int) -> range:
        return range(0, r)

    def virtual_token_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.bias

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

    trainable = False  # it owns no parameters (its tensors are someone else's)

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

    trainable = True
    needs_r = True
    has_virtual_tokens = True

    def __init__(
        self,
        head_dim: int,
        r: int | None = None,
        scale: float | None = None,
        kv_heads: int = 1,
        seed: int = 0,
    ) -> None:
        r = type(self).resolve_r(head_dim, r)
        super().__init__(head_dim, r, scale)
        self.elu = EluFeatureMap(head_dim, scale=self.scale)
        self.exp = ExpFeatureMap(head_dim, r - head_dim, self.scale, kv_heads=kv_heads, seed=seed)

    @classmethod
    def resolve_r(
        cls, head_dim: int, r: int | None = None, *, head_dim_name: str = "head_dim"
    ) -> int:
        if r is None or r <= head_dim:
            raise ValueError(
                f"feature_map 'elu+exp' has r = {head_dim_name} + n exponential features, so it "
                f"needs r > {head_dim_name} = {head_dim}, got r={r}"
            )
        return r

    @classmethod
    def virtual_token_slots(cls, head_dim: int, r: int) -> range:
        return range(head_dim, r)  # after the D ELU features

    def kernel_map(self) -> FeatureMap:
        return self.elu

    def virtual_token_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.exp.weight, self.exp.bias

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

    fixed_r = True

    def __init__(self, head_dim: int, r: int | None = None, scale: float | None = None) -> None:
        super().__init__(head_dim, type(self).resolve_r(head_dim, r), scale)

    @classmethod
    def resolve_r(
        cls, head_dim: int, r: int | None = None, *, head_dim_name: str = "head_dim"
    ) -> int:
        full = 1 + head_dim + head_dim * head_dim
        if r is not None and r != full:
            raise ValueError(
                f"feature_map 'taylor' has r = 1 + D + D^2 = {full} for {head_dim_name}="
                f"{head_dim}, got r={r}"
            )
        return full

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
