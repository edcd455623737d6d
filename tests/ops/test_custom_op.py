"""The Triton backends as torch.library custom ops: opcheck, and torch.compile against eager.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by the root conftest.py),
so shapes are tiny. The GPU run (benchmarks/gpu.py compile) compiles a whole layer with inductor.
"""

import pytest

pytest.importorskip("triton", reason="the Triton backend needs the triton package (not installed)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import linmix  # noqa: E402
from linmix.ops.common.custom_op import TRITON_OPS  # noqa: E402
from linmix.ops.dispatch import available_backends  # noqa: E402
from tests.ops.utils import rel_err  # noqa: E402


def _inputs(op_name, B=1, T=20, H=2, K=16, V=16):
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    extra = {}
    if op_name in ("simple_gla", "gated_delta_rule"):
        extra["g"] = F.logsigmoid(torch.randn(B, T, H))
    if op_name == "gla":
        extra["g"] = F.logsigmoid(torch.randn(B, T, H, K)) / 4
    if op_name in ("delta_rule", "gated_delta_rule"):
        k = F.normalize(k, dim=-1)
        extra["beta"] = torch.rand(B, T, H)
    return q, k, v, extra


def _call(op_name, backend, q, k, v, extra, h0):
    fn = getattr(linmix.ops, "delta_rule" if op_name == "gated_delta_rule" else op_name)
    return fn(q, k, v, **extra, initial_state=h0, output_final_state=True, backend=backend)


def test_scalar_decay_opcheck():
    """Schema, fake (meta) form, autograd registration and AOT dispatch of the custom op."""
    op = TRITON_OPS["scalar_decay_chunk"]
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16)
    g = F.logsigmoid(torch.randn(1, 20, 2))
    h0 = torch.randn(1, 2, 16, 16)
    for x in (q, k, v, g, h0):
        x.requires_grad_(True)
    torch.library.opcheck(op.fwd_op, (q, k, v, g, h0, 0.25, True, 16),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_delta_rule_opcheck(gated):
    """The delta rule's op with its saved tensors (A, b, and W in the WY form, the default at this size): the fake
    form gives the real outputs' shapes."""
    op = TRITON_OPS["delta_rule_chunk"]
    q, k, v, extra = _inputs("gated_delta_rule" if gated else "delta_rule", T=70)
    h0 = torch.randn(1, 2, 16, 16)
    args = (q, k, v, extra["beta"], extra.get("g"), h0, 0.25, True, True)
    assert op.fwd_op(*args)[4].numel() > 0  # W kept
    for x in args[:6]:
        if x is not None:
            x.requires_grad_(True)
    torch.library.opcheck(op.fwd_op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


OPS = [name for name in ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
       if "triton" in available_backends("delta_rule" if name == "gated_delta_rule" else name)]


@pytest.mark.parametrize("op_name", OPS)
def test_compiled_equals_eager(op_name):
    """torch.compile (aot_eager: Dynamo + AOTAutograd, no codegen) sees the op as one opaque node."""
    torch._dynamo.reset()
    q, k, v, extra = _inputs(op_name)
    h0 = torch.randn(1, 2, 16, 16)
    leaves = [q, k, v, *extra.values(), h0]
    for x in leaves:
        x.requires_grad_(True)

    def run(q, k, v, h0, extra):
        o, ht = _call(op_name, "triton", q, k, v, extra, h0)
        return (o * o).sum() + (ht * ht).sum()

    compiled = torch.compile(run, backend="aot_eager")
    grads_eager = torch.autograd.grad(run(q, k, v, h0, extra), leaves)
    loss_c = compiled(q, k, v, h0, extra)
    grads_c = torch.autograd.grad(loss_c, leaves)
    assert rel_err(loss_c, run(q, k, v, h0, extra)) < 1e-5
    for ge, gc in zip(grads_eager, grads_c):
        assert rel_err(gc, ge) < 1e-5
