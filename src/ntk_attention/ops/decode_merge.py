"""The no-grad state merge of :func:`~.lse.lse_inference` in one compiled call, for the elu map.

Decoding runs NTK-Attention once per layer and token on a single query, where the work is tiny
and each tensor op's host cost (~5-10 us) is what a step pays: the torch version of the merge
(elu features, one bmm against [Z | kappa], the direct-space merge) is ~20 ops per layer. This
module does the same arithmetic in one numba-compiled loop that writes the result into the
kernel's output, so a layer costs the kernel plus one call. ``lse_inference``'s torch ops are
its twin (``fused_merge=False``); tests compare the two.

Per query row i of head h (KV head g = h // G), with the kernel's o = E / S and lse = log S,
the state matrix M = [Z | kappa] of KV head g, c the elu map's multiplier sqrt(s) and t the
state's log scale (0 when it has none):

    phi_j = e^{min(c q_j, 0)} + max(c q_j, 0)              (ELU(c q) + 1, precise below -17)
    [b | a] = phi^T M                                       (b = phi^T Z, a = phi^T kappa)
    out = o + (b - max(a, 0) o) / (e^{max(lse - t, -60)} + max(a, 0))

exactly the formula and the floor of ``lse_inference`` (whose docstring derives them), in
float32; the product is summed in another order than MKL's bmm, so the two agree to float32
rounding (~1e-7 relative), and a zero state gives o bit for bit.

Taken only where it applies (:func:`merge_takes`): float32 on CPU, the exact ``elu`` map, and
numba installed; ``lse_inference`` calls it for decoding steps (one query per row) only, since
from ~16 queries per head on the loop's product is slower than the bmm. numba compiles the loop on first use (about a second; cached on disk after
that); a compile failure disables this path with a warning and the torch ops run instead.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .feature_maps import EluFeatureMap, FeatureMap

__all__ = ["MIN_SCALED_LOG_SUM", "available", "merge_into", "merge_takes"]

# The direct-space merge (here and in lse_inference's torch ops) floors e^{lse - t} at e^-60.
MIN_SCALED_LOG_SUM = -60.0
_NO_LOG_SCALE = np.zeros((1, 1), dtype=np.float32)

_compiled = None  # the numba function, built on first use
_broken = False  # set when numba is missing or failed to compile: the torch ops run instead


def _merge_loop(exact, lse, q, matrix, multiplier, log_scale):
    """The loop numba compiles (see the module docstring); plain Python otherwise."""
    batch, heads, rows, value_dim = exact.shape
    head_dim = q.shape[3]
    kv_heads, width = matrix.shape[1], matrix.shape[3]
    groups = heads // kv_heads
    zero, floor = np.float32(0.0), np.float32(MIN_SCALED_LOG_SUM)
    features = np.empty(head_dim, np.float32)
    terms = np.empty(width, np.float32)
    for b in range(batch):
        state = matrix[b if matrix.shape[0] > 1 else 0]
        scales = log_scale[b if log_scale.shape[0] > 1 else 0]
        for h in range(heads):
            g = h // groups
            m = state[g]
            shift = scales[g if scales.shape[0] > 1 else 0]
            for i in range(rows):
                for j in range(head_dim):
                    y = q[b, h, i, j] * multiplier
                    features[j] = np.exp(min(y, zero)) + max(y, zero)
                terms[:] = zero
                for j in range(head_dim):
                    f = features[j]
                    for n in range(width):
                        terms[n] += f * m[j, n]
                mass = max(terms[width - 1], zero)
                denominator = np.exp(max(lse[b, h, i] - shift, floor)) + mass
                for n in range(value_dim):
                    o = exact[b, h, i, n]
                    exact[b, h, i, n] = o + (terms[n] - mass * o) / denominator


def _compile():
    """The numba-compiled merge loop, or None where numba is not installed or fails."""
    global _compiled, _broken
    if _compiled is not None or _broken:
        return _compiled
    try:
        import numba
    except ImportError:
        _broken = True
        return None

    signature = (
        "void(float32[:,:,:,:], float32[:,:,:], float32[:,:,:,:], float32[:,:,:,::1], "
        "float32, float32[:,:])"
    )
    try:
        _compiled = numba.njit(signature, cache=True, nogil=True)(_merge_loop)
    except Exception as err:  # noqa: BLE001 - any compile failure: run the torch ops
        warnings.warn(f"numba could not compile the decoding merge ({err}); using torch ops",
                      RuntimeWarning, stacklevel=3)
        _broken = True
    return _compiled


def available() -> bool:
    """Whether the compiled merge can run here (numba installed and the loop compiled; the
    first call compiles it)."""
    return not _broken and _compile() is not None


def merge_takes(
    q: torch.Tensor,
    matrix: torch.Tensor,
    feature_map: FeatureMap,
    state_log_scale: torch.Tensor | None,
) -> bool:
    """Whether :func:`merge_into` applies: float32 on CPU (queries, state and log scale), the
    exact elu map (r = D), and numba available (compiled here on first use)."""
    return (
        type(feature_map) is EluFeatureMap
        and q.dtype == torch.float32
        and matrix.dtype == torch.float32
        and q.device.type == "cpu"
        and matrix.device.type == "cpu"
        and not q.requires_grad
        and (state_log_scale is None or state_log_scale.dtype == torch.float32)
        and available()
    )


def merge_into(
    exact: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    matrix: torch.Tensor,
    feature_map: EluFeatureMap,
    state_log_scale: torch.Tensor | None,
) -> torch.Tensor:
    """Merge the state into the kernel's output ``exact`` [B, Hq, Lq, Dv] in place and return
    it. ``lse`` [B, Hq, Lq] is the kernel's; q [B, Hq, Lq, D]; ``matrix`` [(B,) Hkv, D, Dv + 1]
    is [Z | kappa] (``state_matrix``); ``state_log_scale`` None, [] , [Hkv] or [B, Hkv].
    Call only where :func:`merge_takes` holds."""
    state = matrix.detach().numpy()
    if state.ndim == 3:
        state = state[None]
    if not state.flags.c_contiguous:
        state = np.ascontiguousarray(state)
    if state_log_scale is None:
        scale = _NO_LOG_SCALE
    else:
        scale = state_log_scale.detach().numpy()
        scale = scale.reshape((1,) * (2 - scale.ndim) + scale.shape)
    _compiled(exact.numpy(), lse.numpy(), q.numpy(), state, feature_map.multiplier, scale)
    return exact
