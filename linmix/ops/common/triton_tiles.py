"""Small ``@triton.jit`` helpers on chunk tiles, shared by the kernel modules.

Conventions: a chunk has C rows (tokens) ``o_c = tl.arange(0, C)``, of which the first ``n_valid``
lie inside the sequence; ``b_t`` [C] is the in-chunk cumulative log2 gate (zeros without a gate).

Transposes: where a kernel needs a [C, C] product both ways round, it forms each by its own
``tl.dot`` from loaded tiles and masks the transposed one with :func:`causal_decay_t`, instead of
feeding ``tl.trans`` of a dot's result into another dot -- the pattern behind Triton's Hopper
miscompilations in versions 3.4 to 3.7.0 (an earlier linmix delta-rule kernel that used it
faulted on the H200). ``tl.trans`` of a loaded tile is fine.
"""

from linmix.ops.common.triton_import import tl, triton

__all__ = ["causal_decay", "causal_decay_t", "last_valid"]


@triton.jit
def causal_decay(scores, b_t, o_c, n_valid, USE_G: tl.constexpr):
    """scores o D for one chunk: rows i, cols j; D_ij = exp2(b_i - b_j) for j <= i < n_valid, else 0.

    The mask is applied to the exponent (-inf) before exp2, so exp2 never sees a positive number
    (rows past the end of the sequence carry b = 0 and would otherwise overflow).
    """
    mask = (o_c[:, None] >= o_c[None, :]) & (o_c[:, None] < n_valid)
    if USE_G:
        return scores * tl.exp2(tl.where(mask, b_t[:, None] - b_t[None, :], float("-inf")))
    return tl.where(mask, scores, 0.0)


@triton.jit
def causal_decay_t(scores_t, b_t, o_c, n_valid, USE_G: tl.constexpr):
    """(scores o D)^T given scores^T: rows j, cols i; the mask and decay of :func:`causal_decay`, transposed."""
    mask = (o_c[None, :] >= o_c[:, None]) & (o_c[None, :] < n_valid)
    if USE_G:
        return scores_t * tl.exp2(tl.where(mask, b_t[None, :] - b_t[:, None], float("-inf")))
    return tl.where(mask, scores_t, 0.0)


@triton.jit
def last_valid(x, o_c, n_valid):
    """x [C] at the chunk's last valid row (a scalar)."""
    return tl.sum(tl.where(o_c == n_valid - 1, x, 0.0))
