"""Intra-chunk scores of the vector-gate (``gla``) chunk form and their backward.

Per chunk of C positions (q, k, b: [C, K], b the cumulative log-gate, non-increasing):

    A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)   (i >= j, else 0).

The chunk is split into sub-blocks of s positions (KERNELS.md section 2):

- diagonal sub-blocks, elementwise: one pass per offset d = i - j in [0, s), vectorised over all
  sub-blocks and positions through shifted views, touching only the s (s + 1) / 2 pairs that
  exist (no masked upper half, no exp of a positive number, no [.., s, s, K] tensor);
- sub-block pairs J < I through the last position r of J: (q_i * exp(b_i - b_r)) . (k_j * exp(b_r
  - b_j)), both exponents <= 0, for the rows after J only.

The log-gate b is a constant here (its gradient comes from dq and dk), so A is bilinear in (q, k):
the backward recomputes the decay factors from b instead of saving them.
"""

from __future__ import annotations

import torch


def _diag_blocks(A: torch.Tensor, s: int) -> torch.Tensor:
    """[m, C, C] -> view [m, C // s, s, s] of its diagonal s x s sub-blocks."""
    m, C, _ = A.shape
    st = A.stride()
    return A.as_strided((m, C // s, s, s), (st[0], s * (st[1] + st[2]), st[1], st[2]), A.storage_offset())


def scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, eg: torch.Tensor, s: int, A: torch.Tensor) -> None:
    """Write the lower-triangular scores into A [m, C, C] (upper part untouched).

    q, k, b: [m, C, K]; eg = exp(g) [m, C, K], the per-step decays (b is their cumulative log).
    """
    m, C, K = q.shape
    nb = C // s
    qb, kb, egb = (x.view(m, nb, s, K) for x in (q, k, eg))
    Ad = _diag_blocks(A, s)
    torch.linalg.vecdot(qb, kb, out=Ad.diagonal(0, -2, -1))
    # P_d[i] = q_i * exp(b_i - b_{i-d}) = P_{d-1}[i] * exp(g_{i-d+1}): one multiply per offset
    P = qb
    for d in range(1, s):
        P = P[:, :, 1:] * egb[:, :, 1:s - d + 1]
        Ad.diagonal(-d, -2, -1).copy_(torch.linalg.vecdot(P, kb[:, :, :s - d]))
    if nb == 1:
        return
    # Off-diagonal: for J from the last but one block down, Qs[:, r0:] = q_i * exp(b_i - b_r(J))
    # with r(J) the last position of block J; going from J to J - 1 rescales the rows already there
    # by exp(b_r(J) - b_r(J-1)) <= 1 and adds block J's rows.
    Qs = torch.empty_like(q)
    for J in range(nb - 2, -1, -1):
        r0, c0 = (J + 1) * s, J * s  # rows r0: (after block J), columns c0:r0 (block J)
        b_r = b[:, r0 - 1:r0]
        if J < nb - 2:
            Qs[:, r0 + s:].mul_(torch.exp(b[:, r0 + s - 1:r0 + s] - b_r))
        torch.mul(q[:, r0:r0 + s], torch.exp(b[:, r0:r0 + s] - b_r), out=Qs[:, r0:r0 + s])
        ks = k[:, c0:r0] * torch.exp(b_r - b[:, c0:r0])
        A[:, r0:, c0:r0] = Qs[:, r0:] @ ks.transpose(-1, -2)


def scores_bwd(dA: torch.Tensor, q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, eg: torch.Tensor, s: int,
               dq: torch.Tensor, dk: torch.Tensor) -> None:
    """Add the gradients of the scores (dA: [m, C, C], only its lower part is read) into dq, dk."""
    m, C, K = q.shape
    nb = C // s
    qb, kb, egb, dqb, dkb = (x.view(m, nb, s, K) for x in (q, k, eg, dq, dk))
    dAd = _diag_blocks(dA, s)
    G = dAd.diagonal(0, -2, -1)[..., None]
    dqb.addcmul_(G, kb)
    dkb.addcmul_(G, qb)
    E = None
    for d in range(1, s):
        # E_d[i] = exp(b_i - b_{i-d}) = E_{d-1}[i] * exp(g_{i-d+1})
        E = egb[:, :, 1:] if E is None else E[:, :, 1:] * egb[:, :, 1:s - d + 1]
        G = dAd.diagonal(-d, -2, -1)[..., None] * E
        dqb[:, :, d:].addcmul_(G, kb[:, :, :s - d])
        dkb[:, :, :s - d].addcmul_(G, qb[:, :, d:])
    if nb == 1:
        return
    W = torch.empty_like(q)  # W[:, r0:] = exp(b_i - b_r(J)), maintained as in ``scores``
    for J in range(nb - 2, -1, -1):
        r0, c0 = (J + 1) * s, J * s
        b_r = b[:, r0 - 1:r0]
        if J < nb - 2:
            W[:, r0 + s:].mul_(torch.exp(b[:, r0 + s - 1:r0 + s] - b_r))
        torch.exp(b[:, r0:r0 + s] - b_r, out=W[:, r0:r0 + s])
        ek = torch.exp(b_r - b[:, c0:r0])
        eq = W[:, r0:]
        dA_J = dA[:, r0:, c0:r0]
        dq[:, r0:].addcmul_(dA_J @ (k[:, c0:r0] * ek), eq)
        dk[:, c0:r0].addcmul_(dA_J.transpose(-1, -2) @ (q[:, r0:] * eq), ek)
