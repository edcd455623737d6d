"""GPU: gla Triton launch-parameter sweep (fwd, fwd+bwd at B=8, T=8192) and a per-kernel profile.

    python benchmarks/gla_tune.py
"""
# Time gla (bf16, standard shape) fwd / fwd+bwd under a few launch settings, then a per-kernel profile.
import torch, torch.nn.functional as F, triton.testing, linmix
from linmix.ops.gla.triton import LAUNCH
B, T, H, K, V = 8, 8192, 16, 128, 128
q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for d in (K, K, V))
g = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).requires_grad_()
do = torch.randn_like(v)

def fwd():
    with torch.no_grad():
        linmix.ops.gla(q, k, v, g, backend="triton")

def fwd_bwd():
    o, _ = linmix.ops.gla(q, k, v, g, backend="triton")
    torch.autograd.grad(o, (q, k, v, g), do)

def bench():
    return [round(triton.testing.do_bench(f, quantiles=[0.5]), 3) for f in (fwd, fwd_bwd)]

print("default", bench())
for name, change in [("states", dict(block_v=32)), ("states", dict(num_warps=4)), ("outputs", dict(block_k=64)),
                     ("outputs", dict(num_stages=2)), ("dqk", dict(block_k=64)), ("dqk", dict(num_stages=2)),
                     ("dv", dict(num_warps=4))]:
    old = {a: getattr(LAUNCH.kernels[name], a) for a in change}
    for a, x in change.items():
        setattr(LAUNCH.kernels[name], a, x)
    print(name, change, bench())
    for a, x in old.items():
        setattr(LAUNCH.kernels[name], a, x)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    fwd_bwd()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
