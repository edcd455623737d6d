"""GPU: fused_recurrent at bf16 against the reference (fwd + every gradient), then the decode microbenchmark and its block sweep.

    python benchmarks/fused_recurrent_check.py [--no-bench]   # --no-bench: the accuracy part only
"""
# Real-shape check of fused_recurrent against the reference (bf16 inputs, fwd + every gradient), then the decode benchmark.
import os, sys, torch, torch.nn.functional as F
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
from linmix.ops import delta_rule, gla, linear_attn, simple_gla
from linmix.ops.common.fused_recurrent import fused_recurrent, decode_benchmark
B, H, K, V = (8, 4, 128, 128) if dev == "cuda" else (1, 1, 16, 16)
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
lengths = [1, 0, 5, 16, 3]
cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=dev, dtype=torch.int32)
worst = 0.0
for T, cu_ in ((1, None), (7, None), (sum(lengths), cu)):
    Bx, N = (1, len(lengths)) if cu_ is not None else (B, B)
    q = torch.randn(Bx, T, H, K, device=dev).bfloat16()
    k = F.normalize(torch.randn(Bx, T, H, K, device=dev), dim=-1).bfloat16()
    v = torch.randn(Bx, T, H, V, device=dev).bfloat16()
    g, gk = F.logsigmoid(torch.randn(Bx, T, H, device=dev)), F.logsigmoid(torch.randn(Bx, T, H, K, device=dev))
    beta, h0 = torch.rand(Bx, T, H, device=dev), torch.randn(N, H, K, V, device=dev)
    fams = {"linear_attn": ({}, lambda x, **kw: linear_attn(x["q"], x["k"], x["v"], **kw)),
            "simple_gla": ({"g": g}, lambda x, **kw: simple_gla(x["q"], x["k"], x["v"], x["g"], **kw)),
            "gla": ({"gk": gk}, lambda x, **kw: gla(x["q"], x["k"], x["v"], x["gk"], **kw)),
            "delta_rule": ({"beta": beta}, lambda x, **kw: delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)),
            "gated_delta_rule": ({"beta": beta, "g": g},
                                 lambda x, **kw: delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], **kw))}
    for name, (gates, ref_fn) in fams.items():
        base = {"q": q, "k": k, "v": v, **gates, "initial_state": h0}
        outs = {}
        for side in ("reference", "fused"):
            x = {n: t.detach().clone().requires_grad_() for n, t in base.items()}
            kw = dict(initial_state=x["initial_state"], output_final_state=True, cu_seqlens=cu_)
            if side == "fused":
                o, s = fused_recurrent(x["q"], x["k"], x["v"], **{n: x[n] for n in gates}, **kw)
            else:
                o, s = ref_fn(x, backend="reference", **kw)
            torch.manual_seed(1)
            ((o.float() * torch.randn_like(o.float())).sum() + (s * torch.randn_like(s)).sum()).backward()
            outs[side] = {"o": o, "state": s, **{"d" + n: t.grad for n, t in x.items()}}
        errs = {n: rel(outs["fused"][n], r) for n, r in outs["reference"].items()}
        worst = max(worst, max(errs.values()))
        print(f"T={T} varlen={cu_ is not None} {name}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))
print("worst relative error", worst, "(bf16 budget 1e-2)")
if dev == "cuda" and "--no-bench" not in sys.argv:
    print("decode us", {n: round(t, 1) for n, t in decode_benchmark().items()})
    print("decode us through the API", {n: round(t, 1) for n, t in decode_benchmark(through_api=True).items()})
    print("decode us in place", {n: round(t, 1) for n, t in decode_benchmark(in_place=True).items()})
    for bv in (8, 16, 32, 64):
        for w in (1, 2, 4):
            print("BV", bv, "warps", w, {n: round(t, 1) for n, t in decode_benchmark(block_v=bv, num_warps=w).items()})
