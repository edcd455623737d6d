r"""What one shard of a sequence does to the recurrent state: its transition M and local state E.

Every recurrence family of :mod:`linmix.ops` is affine in its state. Over a run of tokens (a
*segment*: a shard of the sequence, or the part of a packed sequence inside a shard) the state
leaving the segment is

    S_out = M S_in + E,        E = the state leaving the segment from S_in = 0,

and the segment's outputs are affine in S_in too: o_t = P_t S_in + (outputs from S_in = 0). Per head:

=================  ============================================  ==========================
family             M (product of the per-token transitions)      kind
=================  ============================================  ==========================
``linear_attn``    I                                             ``"identity"`` (None)
``simple_gla``     exp(sum_t g_t)                                ``"scalar"``  [B, H]
``gla``            Diag(exp(sum_t g_t))                          ``"vector"``  [B, H, K]
``delta_rule``     prod_t exp(g_t) (I - beta_t k_t k_t^T)        ``"matrix"``  [B, H, K, K]
=================  ============================================  ==========================

(later tokens on the left of the product). This module computes, without a loop over tokens:

* :func:`carry_summary` -- (M, E) of a segment (what a rank hands to the next one);
* :func:`initial_state_grad` -- (M, G) with G = dL/dS_in for a given output gradient dO (and an
  optional gradient of the segment's final state): G = sum_t P_t^T do_t (+ M^T dS_out), what a
  rank hands to the previous one in the backward pass.

Decayed linear families (``linear_attn``, ``simple_gla``, ``gla``). With c_t = sum_{s > t} g_s
(the decay from step t to the end of the segment) and b_t = sum_{s <= t} g_s (from the start to t),
both computed as cumulative sums (no difference of two long sums, no division by a decay):

    M = exp(b_L),   E = sum_t exp(c_t) k_t v_t^T,   P_t = exp(b_t) scale q_t,   G = sum_t P_t^T do_t.

Delta rule (KERNELS.md section 3). Chunks of C tokens with in-chunk cumulative log-gates b,
L = strictly_lower(diag(beta) ((K K^T) o Gamma)), Gamma_ti = exp(b_t - b_i), A = (I + L)^{-1}
(a batched triangular solve), W = A diag(beta) (K * exp(b)), U~ = A diag(beta) V,
K_out = K * exp(b_C - b), Q_in = scale Q * exp(b), A_qk = (Q_in K^T) o D (D_ij = exp(b_i - b_j)
for i >= j, else 0, relative to exp(b_i)); a chunk entered with S_0 leaves with

    S_C = exp(b_C) S_0 + K_out^T (U~ - W S_0)  =  M_c S_0 + e_c,
    M_c = exp(b_C) I - K_out^T W,   e_c = K_out^T U~,
    O   = Q_in S_0 + A_qk (U~ - W S_0)  ->  P_c = Q_in - A_qk W,   f_c = P_c^T dO_c.

The chunk summaries are then combined by a balanced tree of K x K products (log2(#chunks)
batched matmuls): (M_2, e_2) o (M_1, e_1) = (M_2 M_1, M_2 e_1 + e_2) forward, and for the
gradient (M_1, f_1) then (M_2, f_2) -> (M_2 M_1, f_1 + M_1^T f_2). Zero padding at the end of
a segment is exact: a padded step has k = 0, beta = 0, g = 0 (an identity transition) and q = 0.
Everything is computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from linmix.ops.common.utils import compute_dtype

TRANSITION_KINDS = {"linear_attn": "identity", "simple_gla": "scalar", "gla": "vector", "delta_rule": "matrix"}
DEFAULT_CHUNK = 64
# Delta-rule summaries handle at most this many chunk matrices (B * H * chunks) at a time.
MAX_CHUNK_BATCH = 4096


def _check_op(op: str) -> str:
    if op not in TRANSITION_KINDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(TRANSITION_KINDS)}")
    return TRANSITION_KINDS[op]


def transition_shape(op: str, B: int, H: int, K: int) -> tuple[int, ...] | None:
    """Shape of M for one shard: None (identity), [B, H], [B, H, K] or [B, H, K, K]."""
    kind = _check_op(op)
    return {"identity": None, "scalar": (B, H), "vector": (B, H, K), "matrix": (B, H, K, K)}[kind]


def apply_transition(M: torch.Tensor | None, S: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """M S (or M^T S) for a state (or state gradient) S [B, H, K, V'] of any width V'.

    M is None (identity), [B, H] (scalar), [B, H, K] (vector) or [B, H, K, K] (matrix). The columns
    of S are independent, so S may be any block of columns of a state.
    """
    if M is None:
        return S
    if M.dim() == S.dim() - 2:
        return M[..., None, None] * S
    if M.dim() == S.dim() - 1:
        return M[..., None] * S
    return (M.transpose(-1, -2) if transpose else M) @ S


def compose_transitions(M_later: torch.Tensor | None, M_earlier: torch.Tensor | None) -> torch.Tensor | None:
    """The transition of two segments in a row: M_later M_earlier."""
    if M_later is None:
        return M_earlier
    if M_earlier is None:
        return M_later
    if M_later.dim() == 4:
        return M_later @ M_earlier
    return M_later * M_earlier


def _reverse_exclusive_cumsum(g: torch.Tensor) -> torch.Tensor:
    """c_t = sum_{s > t} g_s along dim 1 (a cumulative sum from the end; no subtraction of totals)."""
    c = torch.zeros_like(g)
    if g.shape[1] > 1:
        c[:, :-1] = g[:, 1:].flip(1).cumsum(1).flip(1)
    return c


def _linear_gate(op: str, gates: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    if op == "linear_attn":
        return None
    return gates[0].to(dtype)


# -- decayed linear families ----------------------------------------------------------------------

def _linear_carry(op, k, v, gates, dtype):
    g = _linear_gate(op, gates, dtype)
    k, v = k.to(dtype), v.to(dtype)
    if g is None:
        return None, torch.einsum("blhk,blhv->bhkv", k, v)
    w = torch.exp(_reverse_exclusive_cumsum(g))
    kw = k * (w[..., None] if g.dim() == 3 else w)
    return torch.exp(g.sum(1)), torch.einsum("blhk,blhv->bhkv", kw, v)


def _linear_adjoint(op, q, gates, do, scale, dtype):
    g = _linear_gate(op, gates, dtype)
    q, do = q.to(dtype) * scale, do.to(dtype)
    if g is None:
        return None, torch.einsum("blhk,blhv->bhkv", q, do)
    w = torch.exp(g.cumsum(1))
    qw = q * (w[..., None] if g.dim() == 3 else w)
    return torch.exp(g.sum(1)), torch.einsum("blhk,blhv->bhkv", qw, do)


# -- delta rule --------------------------------------------------------------------------------------

def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """x [B, L, H, *r] -> [N, B*H, C, *r] (time-major chunks, zero-padded at the end)."""
    B, L, H = x.shape[:3]
    r = x.shape[3:]
    N = -(-L // C)
    if N * C != L:
        x = torch.cat([x, x.new_zeros(B, N * C - L, H, *r)], 1)
    x = x.reshape(B, N, C, H, *r).movedim(3, 1)  # [B, H, N, C, *r]
    return x.reshape(B * H, N, C, *r).transpose(0, 1)


class _DeltaChunks:
    """The WY pieces of a run of delta-rule chunks (see the module docstring); [n, BH, C, ...]."""

    def __init__(self, k, beta, g, C):
        n, BH = k.shape[:2]
        self.k = k
        if g is None:
            self.b = None
            D = torch.ones(C, C, dtype=k.dtype, device=k.device).tril()
        else:
            self.b = g.cumsum(-1)  # [n, BH, C]
            diff = self.b[..., :, None] - self.b[..., None, :]
            D = diff.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=k.device).tril(), float("-inf")).exp()
        self.D = D
        KKD = (k @ k.transpose(-1, -2)) * D
        L = (KKD * beta[..., None]).tril(-1)
        eye = torch.eye(C, dtype=k.dtype, device=k.device).expand(n, BH, C, C)
        self.A = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
        self.beta = beta
        k_in = k if self.b is None else k * torch.exp(self.b)[..., None]
        self.W = self.A @ (k_in * beta[..., None])
        if self.b is None:
            self.k_out, self.decay = k, None
        else:
            b_last = self.b[..., -1:]
            self.k_out = k * torch.exp(b_last - self.b)[..., None]
            self.decay = torch.exp(b_last)[..., None]  # [n, BH, 1, 1]

    def transitions(self) -> torch.Tensor:
        """M_c = exp(b_C) I - K_out^T W, [n, BH, K, K]."""
        M = -(self.k_out.transpose(-1, -2) @ self.W)
        diag = M.diagonal(dim1=-2, dim2=-1)
        diag += 1.0 if self.decay is None else self.decay[..., 0]
        return M

    def states(self, v: torch.Tensor) -> torch.Tensor:
        """e_c = K_out^T U~ with U~ = A diag(beta) V, [n, BH, K, V]."""
        return self.k_out.transpose(-1, -2) @ (self.A @ (v * self.beta[..., None]))

    def initial_state_grads(self, q: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
        """f_c = (Q_in - A_qk W)^T dO, [n, BH, K, V] (q already scaled)."""
        q_in = q if self.b is None else q * torch.exp(self.b)[..., None]
        A_qk = (q @ self.k.transpose(-1, -2)) * self.D
        P = q_in - A_qk @ self.W
        return P.transpose(-1, -2) @ do


def _tree_forward(M: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose (M_0, X_0), ..., (M_{n-1}, X_{n-1}) in order: (M_{n-1}...M_0, sum_i M_{n-1}..M_{i+1} X_i)."""
    while M.shape[0] > 1:
        n2 = M.shape[0] // 2 * 2
        lo, hi = M[0:n2:2], M[1:n2:2]
        X_new = torch.baddbmm(X[1:n2:2].flatten(0, 1), hi.flatten(0, 1), X[0:n2:2].flatten(0, 1))
        M_new = (hi.flatten(0, 1) @ lo.flatten(0, 1))
        X_new, M_new = X_new.view(n2 // 2, *X.shape[1:]), M_new.view(n2 // 2, *M.shape[1:])
        if n2 < M.shape[0]:  # an odd one out moves up a level unchanged
            X_new, M_new = torch.cat([X_new, X[-1:]]), torch.cat([M_new, M[-1:]])
        M, X = M_new, X_new
    return M[0], X[0]


def _tree_reverse(M: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose for the gradient of the entering state: (M_{n-1}...M_0, sum_i (M_{i-1}..M_0)^T F_i)."""
    while M.shape[0] > 1:
        n2 = M.shape[0] // 2 * 2
        lo, hi = M[0:n2:2], M[1:n2:2]
        F_new = torch.baddbmm(F[0:n2:2].flatten(0, 1), lo.flatten(0, 1).transpose(-1, -2), F[1:n2:2].flatten(0, 1))
        M_new = (hi.flatten(0, 1) @ lo.flatten(0, 1))
        F_new, M_new = F_new.view(n2 // 2, *F.shape[1:]), M_new.view(n2 // 2, *M.shape[1:])
        if n2 < M.shape[0]:
            F_new, M_new = torch.cat([F_new, F[-1:]]), torch.cat([M_new, M[-1:]])
        M, F = M_new, F_new
    return M[0], F[0]


def _delta_slices(B: int, H: int, L: int, C: int) -> list[tuple[int, int]]:
    N = max(1, -(-L // C))
    step = max(1, MAX_CHUNK_BATCH // (B * H))
    return [(n, min(n + step, N)) for n in range(0, N, step)]


def _delta_inputs(k, gates, C, dtype):
    beta, g = gates
    kc = _to_chunks(k.to(dtype), C)
    bc = _to_chunks(beta.to(dtype), C)
    gc = None if g is None else _to_chunks(g.to(dtype), C)
    return kc, bc, gc


def _delta_carry(k, v, gates, C, dtype):
    B, L, H, K = k.shape
    kc, bc, gc = _delta_inputs(k, gates, C, dtype)
    vc = _to_chunks(v.to(dtype), C)
    M_acc = E_acc = None
    for n0, n1 in _delta_slices(B, H, L, C):
        ch = _DeltaChunks(kc[n0:n1], bc[n0:n1], None if gc is None else gc[n0:n1], C)
        M, E = _tree_forward(ch.transitions(), ch.states(vc[n0:n1]))
        if M_acc is None:
            M_acc, E_acc = M, E
        else:
            M_acc, E_acc = M @ M_acc, torch.baddbmm(E, M, E_acc)
    return M_acc.view(B, H, K, K), E_acc.view(B, H, K, -1)


def _delta_adjoint(q, k, gates, do, scale, C, dtype):
    B, L, H, K = k.shape
    kc, bc, gc = _delta_inputs(k, gates, C, dtype)
    qc = _to_chunks(q.to(dtype) * scale, C)
    dc = _to_chunks(do.to(dtype), C)
    M_acc = G_acc = None
    for n0, n1 in _delta_slices(B, H, L, C):
        ch = _DeltaChunks(kc[n0:n1], bc[n0:n1], None if gc is None else gc[n0:n1], C)
        M, G = _tree_reverse(ch.transitions(), ch.initial_state_grads(qc[n0:n1], dc[n0:n1]))
        if M_acc is None:
            M_acc, G_acc = M, G
        else:
            G_acc = torch.baddbmm(G_acc, M_acc.transpose(-1, -2), G)
            M_acc = M @ M_acc
    return M_acc.view(B, H, K, K), G_acc.view(B, H, K, -1)


# -- public ----------------------------------------------------------------------------------------

def carry_summary(op: str, k: torch.Tensor, v: torch.Tensor, gates: tuple = (), *, chunk_size: int | None = None,
                  initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""(M, S_out) of a segment: its transition and the state it leaves from ``initial_state``.

    S_out = M S_in + E with E the state from S_in = 0; with ``initial_state`` the returned state is
    M initial_state + E (the state a fresh sequence with that initial state leaves).

    Args:
        op: ``"linear_attn" | "simple_gla" | "gla" | "delta_rule"``.
        k: [B, L, H, K] keys; v: [B, L, H, V] values (any float dtype).
        gates: the op's gate arguments: () for ``linear_attn``, (g,) for ``simple_gla``
            (g [B, L, H]) and ``gla`` (g [B, L, H, K]), (beta, g) for ``delta_rule``
            (beta [B, L, H], g [B, L, H] or None).
        chunk_size: chunk length of the delta-rule summary (default 64); unused otherwise.
        initial_state: optional [B, H, K, V] state entering the segment.

    Returns:
        (M: None (identity), [B, H], [B, H, K] or [B, H, K, K]; state [B, H, K, V]), float32
        (float64 for float64 inputs).

    Example:
        >>> import torch, torch.nn.functional as F, linmix
        >>> k, v = torch.randn(1, 50, 2, 8), torch.randn(1, 50, 2, 4)
        >>> g = F.logsigmoid(torch.randn(1, 50, 2, 8))
        >>> M, E = carry_summary("gla", k, v, (g,))
        >>> S0 = torch.randn(1, 2, 8, 4)
        >>> _, S = linmix.ops.gla(k, k, v, g, initial_state=S0, output_final_state=True)
        >>> torch.allclose(S, apply_transition(M, S0) + E, atol=1e-5)
        True
    """
    kind = _check_op(op)
    dtype = compute_dtype(k)
    if kind == "matrix" and k.shape[1] == 0:
        M, E = _empty_segment(k, v.shape[-1], dtype)
    elif kind == "matrix":
        M, E = _delta_carry(k, v, gates, chunk_size or DEFAULT_CHUNK, dtype)
    else:
        M, E = _linear_carry(op, k, v, gates, dtype)
    if initial_state is not None:
        E = E + apply_transition(M, initial_state.to(dtype))
    return M, E


def _empty_segment(x: torch.Tensor, V: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, zeros) of a segment without tokens: the identity transition [B, H, K, K] and a zero [B, H, K, V]."""
    B, _, H, K = x.shape
    return (torch.eye(K, dtype=dtype, device=x.device).expand(B, H, K, K).clone(),
            x.new_zeros(B, H, K, V, dtype=dtype))


def initial_state_grad(op: str, q: torch.Tensor, k: torch.Tensor, gates: tuple, do: torch.Tensor, *, scale: float,
                       chunk_size: int | None = None,
                       final_state_grad: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""(M, G): a segment's transition and the gradient of the state entering it.

    G = dL/dS_in for L = <dO, o> + <final_state_grad, S_out>, i.e. sum_t P_t^T do_t + M^T dS_out
    (the outputs and the leaving state are affine in S_in, so G does not depend on S_in).

    Args:
        op, k, gates, chunk_size: as in :func:`carry_summary`.
        q: [B, L, H, K] queries; do: [B, L, H, V] gradient of the outputs.
        scale: the op's query scale.
        final_state_grad: optional [B, H, K, V] gradient of the state leaving the segment.

    Returns:
        (M as in :func:`carry_summary`, G [B, H, K, V]) in float32 (float64 for float64 inputs).
    """
    kind = _check_op(op)
    dtype = compute_dtype(q)
    if kind == "matrix" and q.shape[1] == 0:
        M, G = _empty_segment(q, do.shape[-1], dtype)
    elif kind == "matrix":
        M, G = _delta_adjoint(q, k, gates, do, scale, chunk_size or DEFAULT_CHUNK, dtype)
    else:
        M, G = _linear_adjoint(op, q, gates, do, scale, dtype)
    if final_state_grad is not None:
        G = G + apply_transition(M, final_state_grad.to(dtype), transpose=True)
    return M, G


def transition(op: str, k: torch.Tensor, gates: tuple = (), *, chunk_size: int | None = None) -> torch.Tensor | None:
    """The transition M of a segment alone (see :func:`carry_summary`); None for ``linear_attn``."""
    v = k.new_zeros(*k.shape[:3], 1)
    return carry_summary(op, k, v, gates, chunk_size=chunk_size)[0]


__all__ = ["TRANSITION_KINDS", "apply_transition", "carry_summary", "compose_transitions", "initial_state_grad",
           "transition", "transition_shape"]
