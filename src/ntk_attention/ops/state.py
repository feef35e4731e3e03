"""The NTK-Attention state (Z, kappa): its query-side terms, kappa's parameterisation, and the
closed-form state of a finite prefix.

Every path (lse, fused, naive) evaluates the state through :func:`state_terms`, so the only
thing they differ in is how the exact softmax part is computed and merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .feature_maps import FeatureMap, get_feature_map

__all__ = [
    "MASS_FLOOR",
    "StateTerms",
    "deferred_nonnegative_projection",
    "grouped_state_terms",
    "nonnegative",
    "prefix_to_state",
    "project_nonnegative_grad",
    "state_features",
    "state_matrix",
    "state_terms",
]

# Floor of phi(q)^T kappa (in the offset's units) in the fused path, so log() is finite and
# Z keeps its gradient at kappa = 0 (the adapter's initial state). It trades two errors:
# it adds 1e-20 to the row's exact mass sum_j e^{l_j} (relative error < 1e-4 unless every
# logit of the row is below -37), and the state's softmax weight ~1e-20 / e^{max_j l_j}
# must stay a normal float32/bfloat16 number for its gradient to exist at kappa = 0 (max
# logit < ~40; rows with larger logits have gradients below e^-40 anyway). In float16 that
# weight underflows: a state at kappa = 0 gets no gradient there (use bf16 or fp32).
MASS_FLOOR = 1e-20

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class StateTerms:
    """phi(q)^T kappa and phi(q)^T Z for every query, in a shared log scale.

    The true terms are ``a = e^{log_offset} * mass`` and ``b = e^{log_offset} * numer``:
      log_offset [B, Hq, Lq]     (the feature map's offset plus the state's own log scale)
      mass       [B, Hq, Lq]     phi(q)^T kappa without the offset (>= 0 for valid states)
      numer      [B, Hq, Lq, D]  phi(q)^T Z without the offset
    All three are kept in float32 (float64 for float64 inputs).
    """

    __slots__ = ("log_offset", "mass", "numer")

    def __init__(self, log_offset: torch.Tensor, mass: torch.Tensor, numer: torch.Tensor):
        self.log_offset = log_offset
        self.mass = mass
        self.numer = numer


def state_terms(
    q: torch.Tensor,
    z: State,
    kappa: torch.Tensor,
    feature_map: FeatureMap,
    state_log_scale: torch.Tensor | None = None,
    readers: torch.Tensor | None = None,
) -> StateTerms:
    """Evaluate phi(q)^T kappa and phi(q)^T Z (Z dense or Z = Z_A Z_B) for q [B, Hq, Lq, D].

    Query heads are grouped by KV head (head h uses KV head h // G, G = Hq / Hkv, the
    convention of ``repeat_kv`` in transformers), so the feature map sees [B, Hkv, G*Lq, D].
    kappa is [Hkv, r] or per row [B, Hkv, r]; Z likewise with a trailing D. ``readers``
    (bool, broadcastable to [B, Hq, Lq]; see ``sink.state_readers``) zeroes phi(q) of the
    queries that do not read the state: a = b = 0 there, so every path returns the base
    attention for them and the state gets no gradient from them.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = kappa.shape[-2]
    rows = (q_heads // kv_heads) * q_len
    grouped = q.reshape(batch, kv_heads, rows, head_dim)
    if readers is not None:
        readers = readers.expand(batch, q_heads, q_len).reshape(batch, kv_heads, rows, 1)
    offset, mass, numer = grouped_state_terms(
        grouped, z, kappa, feature_map, state_log_scale, readers
    )
    offset = torch.zeros_like(mass) if offset is None else offset.expand(mass.shape)
    return StateTerms(  # [B, Hkv, N, 1] -> [B, Hq, Lq]
        log_offset=offset.reshape(batch, q_heads, q_len),
        mass=mass.reshape(batch, q_heads, q_len),
        numer=numer.reshape(batch, q_heads, q_len, numer.shape[-1]),
    )


def grouped_state_terms(
    grouped: torch.Tensor,
    z: State,
    kappa: torch.Tensor,
    feature_map: FeatureMap,
    state_log_scale: torch.Tensor | None = None,
    readers: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`state_terms` for queries already grouped by KV head, [B, Hkv, N, D]: returns
    (log_offset, mass, numer) shaped [B, Hkv, N, 1], [B, Hkv, N, 1], [B, Hkv, N, Dv] in
    float32 (float64 for float64 queries); the trailing 1 broadcasts against numer. log_offset
    is None where it is 0 (maps with the default ``log_forward`` and no state_log_scale), else
    broadcastable to [B, Hkv, N, 1]. ``readers`` [B, Hkv, N, 1] bool: phi = 0 where False."""
    compute_dtype = torch.promote_types(grouped.dtype, torch.float32)
    features, offset = state_features(grouped, feature_map, kappa.shape[-1], compute_dtype)
    # Matmuls against [Hkv, r, .] or per row [B, Hkv, r, .] broadcast over features
    # [B, Hkv, N, r]. (Not one matmul against [Z | kappa]: its cat copies the whole state on
    # every call; decoding, where the state is fixed, uses state_matrix instead.)
    mass = features @ _as(kappa, compute_dtype).unsqueeze(-1)  # [B, Hkv, N, 1]
    if isinstance(z, tuple):
        z_a, z_b = (_as(t, compute_dtype) for t in z)
        numer = (features @ z_a) @ z_b  # [B, Hkv, N, D]
    else:
        numer = features @ _as(z, compute_dtype)  # [B, Hkv, N, D]
    if readers is not None:
        # phi = 0 for the exempt queries, applied to the products (in place: a matmul's
        # backward does not read its output) rather than to phi, whose masked copy autograd
        # would keep beside phi itself for the matmuls' backward.
        readers = readers.to(compute_dtype)
        mass.mul_(readers)
        numer.mul_(readers)
    if offset is not None:
        offset = _as(offset, compute_dtype)
    if state_log_scale is not None:
        scale = _as(state_log_scale, compute_dtype)
        scale = scale[..., None, None] if scale.dim() >= 1 else scale  # [(B,) Hkv, 1, 1]
        offset = scale if offset is None else offset + scale
    return offset, mass, numer


def state_features(
    queries: torch.Tensor, feature_map: FeatureMap, r: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """phi(queries) [..., r] in ``dtype`` and its log offset [..., 1] (None for maps whose
    offset is 0, i.e. the default ``log_forward``: it is never built). Raises ValueError if the
    map does not give r features for each query."""
    if type(feature_map).log_forward is FeatureMap.log_forward:  # offset 0: skip it
        features, offset = feature_map(queries), None
    else:
        features, offset = feature_map.log_forward(queries)
    if features.shape[:-1] != queries.shape[:-1] or features.shape[-1] != r:
        raise ValueError(
            f"feature_map maps {tuple(queries.shape)} to {tuple(features.shape)}; expected "
            f"[..., r] with r = {r} from the state"
        )
    return _as(features, dtype), offset


def state_matrix(z: State, kappa: torch.Tensor) -> torch.Tensor:
    """[Z | kappa]: the state as one matrix [(B,) Hkv, r, Dv + 1] in float32 (float64
    for a float64 state), so one matmul gives phi^T Z and phi^T kappa together. A low-rank state
    is multiplied out (Z = Z_A Z_B). What :func:`~.lse.lse_inference` takes; the adapter keeps
    one per layer for the length of a ``generate`` call."""
    dense = z[0] @ z[1] if isinstance(z, tuple) else z
    dtype = torch.promote_types(dense.dtype, torch.float32)
    return torch.cat([_as(dense, dtype), _as(kappa, dtype).unsqueeze(-1)], dim=-1)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (decoding calls this per layer
    and token, where each op's host cost counts)."""
    return t if t.dtype == dtype else t.to(dtype)


class _NonNegative(torch.autograd.Function):
    """clamp(theta, min=0) with a projected-gradient backward (see :func:`nonnegative`)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(theta)
        return theta.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (theta,) = ctx.saved_tensors
        if _PROJECTION_DEFERRED:
            return grad
        return grad * ((theta > 0) | (grad < 0)).to(grad.dtype)


# The projection is not linear, so it does not commute with summing gradients: data-parallel
# training must project the all-reduced gradient, not each rank's (train/distributed.py).
_PROJECTION_DEFERRED = False


@contextlib.contextmanager
def deferred_nonnegative_projection() -> Iterator[None]:
    """Within this block, :func:`nonnegative`'s backward passes the gradient unprojected;
    apply :func:`project_nonnegative_grad` to theta once its gradient is complete."""
    global _PROJECTION_DEFERRED
    previous, _PROJECTION_DEFERRED = _PROJECTION_DEFERRED, True
    try:
        yield
    finally:
        _PROJECTION_DEFERRED = previous


def project_nonnegative_grad(theta: torch.Tensor) -> None:
    """The projection :func:`nonnegative`'s backward applies, on ``theta.grad`` in place."""
    if theta.grad is not None:
        theta.grad.masked_fill_((theta <= 0) & (theta.grad > 0), 0)


def nonnegative(theta: torch.Tensor) -> torch.Tensor:
    """kappa = max(theta, 0), trainable from theta = 0.

    Forward: clamp(theta, min=0). Backward: the gradient passes where theta > 0, and where
    theta <= 0 only if it points to a larger kappa (gradient < 0, so a descent step raises
    theta). This is projected gradient descent on kappa >= 0: kappa initialised at 0 still
    trains, unlike abs(theta), whose gradient at 0 is 0, or relu, which is dead below 0.
    Without autograd it is a plain clamp (decoding calls it once per layer and token).
    """
    if not (theta.requires_grad and torch.is_grad_enabled()):
        return theta.clamp_min(0)
    return _NonNegative.apply(theta)


def prefix_to_state(
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    feature_map: str | FeatureMap,
    *,
    scale: float | None = None,
    r: int | None = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form state of a prefix: Z = sum_i phi(pK_i) pV_i^T, kappa = sum_i phi(pK_i).

    prefix_k, prefix_v: [Hkv, m, D]. Returns Z [Hkv, r, D] and kappa [Hkv, r]. Exact when
    phi(x)^T phi(y) = e^{s x.y}; approximate for ``favor`` / ``taylor`` (an initialisation, not
    a conversion, for real models: see docs/results/REPORT.md section 2). The prefix is streamed in chunks of
    ``chunk_size`` so long prefixes fit in memory; features are summed in float64.
    """
    if prefix_k.dim() != 3 or prefix_v.dim() != 3 or prefix_k.shape != prefix_v.shape:
        raise ValueError(
            "prefix_k and prefix_v must both be [Hkv, m, D] of the same shape, got "
            f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    head_dim = prefix_k.shape[-1]
    phi = get_feature_map(feature_map, head_dim, r=r, scale=scale)
    z = torch.zeros(prefix_k.shape[0], phi.r, head_dim, dtype=torch.float64)
    kappa = torch.zeros(prefix_k.shape[0], phi.r, dtype=torch.float64)
    for start in range(0, prefix_k.shape[1], chunk_size):
        keys = prefix_k[:, start : start + chunk_size]
        values = prefix_v[:, start : start + chunk_size].double()
        features = phi(keys).double()  # [Hkv, chunk, r]
        z += torch.einsum("hmr,hmd->hrd", features, values)
        kappa += features.sum(1)
    dtype = prefix_k.dtype if prefix_k.is_floating_point() else torch.float32
    return z.to(dtype), kappa.to(dtype)
