"""The shard summaries of linmix.parallel.transitions against token loops and the reference ops (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.parallel import transitions
from linmix.parallel.transitions import apply_transition, carry_summary, initial_state_grad, transition

OPS = ["linear_attn", "simple_gla", "gla", "delta_rule", "deltanet"]  # deltanet: delta_rule without a gate
TOL = 1e-10


def rel(x, ref):
    return float((x - ref).detach().norm() / ref.detach().norm())


def inputs(op, B, L, H, K, V):
    dt = torch.float64
    q, k, v = torch.randn(B, L, H, K, dtype=dt), torch.randn(B, L, H, K, dtype=dt), torch.randn(B, L, H, V, dtype=dt)
    if op == "linear_attn":
        return "linear_attn", q, k * 0.5, v, ()
    if op == "simple_gla":
        return op, q, k, v, (F.logsigmoid(torch.randn(B, L, H, dtype=dt) + 1),)
    if op == "gla":
        return op, q, k, v, (F.logsigmoid(torch.randn(B, L, H, K, dtype=dt) + 1),)
    beta = torch.sigmoid(torch.randn(B, L, H, dtype=dt))
    g = None if op == "deltanet" else F.logsigmoid(torch.randn(B, L, H, dtype=dt) + 1)
    return "delta_rule", q, F.normalize(k, dim=-1), v, (beta, g)


def token_loop_transition(op, k, gates):
    """prod_t A_t (later steps on the left) as a [B, H, K, K] matrix, one token at a time."""
    B, L, H, K = k.shape
    M = torch.eye(K, dtype=k.dtype).expand(B, H, K, K).clone()
    for t in range(L):
        if op == "linear_attn":
            A = torch.eye(K, dtype=k.dtype).expand(B, H, K, K)
        elif op == "simple_gla":
            A = torch.exp(gates[0][:, t])[..., None, None] * torch.eye(K, dtype=k.dtype)
        elif op == "gla":
            A = torch.diag_embed(torch.exp(gates[0][:, t]))
        else:
            beta, g = gates
            kt = k[:, t]
            A = torch.eye(K, dtype=k.dtype) - beta[:, t][..., None, None] * kt[..., :, None] * kt[..., None, :]
            if g is not None:
                A = torch.exp(g[:, t])[..., None, None] * A
        M = A @ M
    return M


def as_matrix(M, B, H, K):
    if M is None:
        return torch.eye(K, dtype=torch.float64).expand(B, H, K, K)
    if M.dim() == 2:
        return M[..., None, None] * torch.eye(K, dtype=M.dtype)
    if M.dim() == 3:
        return torch.diag_embed(M)
    return M


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("L, chunk_size", [(1, 4), (7, 4), (37, 4), (37, 64), (29, 3)])
def test_transition_equals_token_loop(op, L, chunk_size):
    B, H, K, V = 2, 3, 5, 4
    name, q, k, v, gates = inputs(op, B, L, H, K, V)
    M = transition(name, k, gates, chunk_size=chunk_size)
    if name == "linear_attn":
        assert M is None  # the identity: nothing to send
    assert rel(as_matrix(M, B, H, K), token_loop_transition(name, k, gates)) < TOL


def test_delta_transition_over_slices(monkeypatch):
    """The delta-rule summary processes chunk matrices in slices; slice boundaries must not change it."""
    name, q, k, v, gates = inputs("delta_rule", 2, 45, 3, 5, 4)
    M, E = carry_summary(name, k, v, gates, chunk_size=4)
    monkeypatch.setattr(transitions, "MAX_CHUNK_BATCH", 6 * 2)  # two chunks per slice (B * H = 6)
    M_s, E_s = carry_summary(name, k, v, gates, chunk_size=4)
    Mg, G = initial_state_grad(name, q, k, gates, v, scale=0.5, chunk_size=4)
    monkeypatch.setattr(transitions, "MAX_CHUNK_BATCH", 6 * 3)
    Mg_s, G_s = initial_state_grad(name, q, k, gates, v, scale=0.5, chunk_size=4)
    assert rel(M_s, M) < TOL and rel(E_s, E) < TOL and rel(Mg_s, Mg) < TOL and rel(G_s, G) < TOL
    assert rel(M, token_loop_transition(name, k, gates)) < TOL


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("L", [1, 13, 40])
def test_summaries_equal_reference_op(op, L):
    """S_out = M S_in + E and G = dL/dS_in against the reference op and autograd."""
    B, H, K, V = 2, 2, 4, 3
    name, q, k, v, gates = inputs(op, B, L, H, K, V)
    S0 = torch.randn(B, H, K, V, dtype=torch.float64, requires_grad=True)
    o, S = getattr(linmix.ops, name)(q, k, v, *gates, initial_state=S0, output_final_state=True,
                                    backend="reference")
    M, S_pred = carry_summary(name, k, v, gates, chunk_size=8, initial_state=S0.detach())
    assert rel(S_pred, S) < TOL
    _, E = carry_summary(name, k, v, gates, chunk_size=8)
    assert rel(apply_transition(M, S0.detach()) + E, S) < TOL
    do, dS = torch.randn_like(o), torch.randn_like(S)
    G_ref, = torch.autograd.grad((o * do).sum() + (S * dS).sum(), S0)
    M2, G = initial_state_grad(name, q, k, gates, do, scale=K ** -0.5, chunk_size=8, final_state_grad=dS)
    assert rel(G, G_ref) < TOL
    if M is not None:
        assert rel(M2, M) < TOL


def test_summary_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'softmax_attn'"):
        transition("softmax_attn", torch.zeros(1, 2, 1, 2))
