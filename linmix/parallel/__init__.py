r"""Sequence parallelism over ``torch.distributed`` (LASP-2 / ZeCO style) for every recurrence family,
softmax attention, short convolutions, and whole hybrid models.

A sequence of T tokens is split into W contiguous shards of equal length T_local = T / W, one per
rank of a process group: rank r holds positions [r T_local, (r + 1) T_local). Recurrent layers
exchange one fixed-size state per rank (independent of T), attention layers gather keys/values,
short convolutions and sliding windows exchange boundary tokens. Outputs and gradients equal the
single-process run (tested in float64 to ~1e-10 on gloo for W = 2, 3, 4).

The math (recurrent families)
------------------------------
Every family of :mod:`linmix.ops` updates its state S (per head, K x V) affinely,
S_t = A_t S_{t-1} + k_t v_t^T-like terms, with A_t = I (``linear_attn``), exp(g_t) (``simple_gla``),
Diag(exp(g_t)) (``gla``) or exp(g_t)(I - beta_t k_t k_t^T) (``delta_rule``). So the state leaving
rank r's shard is an affine function of the state entering it,

    S_out(r) = M(r) S_in(r) + E(r),    M(r) = A_{last} ... A_{first},   E(r) = S_out(r) from S_in = 0,

M(r) being the identity, a scalar per head, a vector per head or a K x K matrix per head (kept in
float32). Both are computed without a loop over tokens (:mod:`linmix.parallel.transitions`; for
the delta rule from the chunks' WY form: M_chunk = exp(b_C) I - (K exp(b_C - b))^T W, combined by
a tree of K x K products). The outputs of the shard are affine in S_in as well:
o_t = P_t S_in + (outputs from S_in = 0). Hence the forward pass:

    S_in(0) = the user's initial state;   S_in(r) = M(r-1) S_in(r-1) + E(r-1)        (a fold)

after which every rank runs the ordinary op on its shard with ``initial_state = S_in(r)``.

Backward: let L be the total loss and G(r) = d(loss of rank r's outputs)/dS_in(r) = sum_t P_t^T do_t
(computed from dO alone: the map is affine, so G does not depend on S_in). The state leaving rank r
enters rank r + 1, which passes it on through M(r+1), so the gradient that reaches rank r's final
state from later ranks is the reverse fold

    dS_out(r) = G(r+1) + M(r+1)^T dS_out(r+1) = sum_{j > r} M(r+1)^T ... M(j-1)^T G(j).

Each rank then runs the op's own backward with (initial_state = S_in(r), gradient of its final
state = dS_out(r)): the gradient of every local input (q, k, v, gates, beta) is exactly the
gradient of L, because the local op sees the same state on both sides as the single-process run.
The user's initial state enters at rank 0 (and its gradient is returned there).

Packed sequences (``cu_seqlens``, global offsets on every rank): states do not cross sequence
boundaries, so only the last piece of a shard is handed to the next rank and only the first piece
receives a state. A rank whose shard contains a sequence start passes on E of its last piece
alone (M = 0 for the incoming state); a sequence that starts exactly at a shard boundary receives
nothing; sequences entirely inside a shard are ordinary local sequences.

Two strategies (:class:`SequenceParallel`, ``strategy=``), equal results:

* ``"allgather"`` (LASP-2): one all-gather of every rank's (M, E) in the forward pass (and of G in
  the backward), then each rank folds locally; latency of one collective;
* ``"scan"`` (ZeCO All-Scan): the state passes rank to rank by point-to-point sends, pipelined
  over blocks of heads, so each rank receives one state, not W.

Other layers
------------
* softmax attention (:mod:`.attention`): all-gather of the KV heads (reduce-scatter of dK/dV in
  backward) with the causal mask aligned to the shard's global offset; a sliding window only
  needs the previous ``window - 1`` keys (a halo exchange);
* short convolutions (:mod:`.conv`): the previous rank's last (kernel_size - 1) inputs;
* positions (RoPE, position-dependent feature maps) count from the shard's global offset.

Models: ``LinmixForCausalLM(...)(ids_local, labels=labels_local, cu_seqlens=global_offsets,
sequence_parallel=sp)`` (or inside ``with sp:``) runs every layer sharded and returns the global
loss; each rank's parameter gradients are its share (sum over the group = the full gradient), so
it composes with DDP / FSDP2 over the batch dimension (see ``examples/sp_train.py``). Layers run
sharded inside :meth:`ShardLayout.activate`.

Limits: shards must have equal length (T divisible by W); causal ops only; no decoding state
(``use_cache=False``) and no padding masks under a shard (pack sequences with ``cu_seqlens``).
"""

from linmix.parallel.attention import sp_softmax_attn
from linmix.parallel.context import (STRATEGIES, CommStats, Segment, SequenceParallel, ShardLayout,
                                     current_sequence_parallel, resolve_shard)
from linmix.parallel.loss import causal_lm_loss
from linmix.parallel.ops import sp_delta_rule, sp_gla, sp_linear_attn, sp_simple_gla
from linmix.parallel.transitions import apply_transition, carry_summary, initial_state_grad, transition

__all__ = ["STRATEGIES", "CommStats", "Segment", "SequenceParallel", "ShardLayout", "apply_transition",
           "carry_summary", "causal_lm_loss", "current_sequence_parallel", "initial_state_grad", "resolve_shard",
           "sp_delta_rule", "sp_gla", "sp_linear_attn", "sp_simple_gla", "sp_softmax_attn", "transition"]
