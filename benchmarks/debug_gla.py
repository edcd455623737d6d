"""GPU debugging aid: run the gla Triton backend at one shape with CUDA_LAUNCH_BLOCKING=1 and report the failing launch.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/debug_gla.py B T H K V [--state] [--no-grad]
"""
import sys
import traceback

import torch
import torch.nn.functional as F

import linmix

B, T, H, K, V = (int(x) for x in sys.argv[1:6])
state, grad = "--state" in sys.argv, "--no-grad" not in sys.argv
torch.manual_seed(0)
q, k = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(2))
v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
g = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).requires_grad_(grad)
h0 = torch.randn(B, H, K, V, device="cuda") if state else None
try:
    o, ht = linmix.ops.gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    torch.cuda.synchronize()
    if grad:
        torch.autograd.grad((o.float().square().sum() + ht.sum()), [q, k, v, g])
        torch.cuda.synchronize()
    print(f"OK {sys.argv[1:]}")
except Exception as e:  # noqa: BLE001
    frames = [f"{f.name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)][-4:]
    print(f"FAIL {sys.argv[1:]}: {type(e).__name__}: {str(e)[:120]} at {frames}")
