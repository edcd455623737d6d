"""Throughput probe of the conversion's training stages on a SmolLM2-135M-shaped teacher (no download).

    python benchmarks/convert_probe.py --device cuda --target lolcats,gated_deltanet     # the GPU preset's shapes
    python benchmarks/convert_probe.py --device cpu --layers 2 --seq-len 128 --batch-size 2   # CPU smoke run

A randomly initialised Llama with SmolLM2-135M's config (30 layers, hidden 576, intermediate 1536,
9 query / 3 KV heads of dim 64, vocabulary 49152, tied embeddings, RoPE theta 100000) is the
teacher; every layer is converted to the target and the library's own stage functions run a few
steps on random tokens: stage 1 (:func:`linmix.convert.attention_transfer`, the target's default
stage-1 parameters) and stage 2 (:func:`linmix.convert.distill`, KL through LoRA rank 8), with bf16
autocast on CUDA, exactly as ``linmix convert`` / ``examples/convert_smollm2.py --preset gpu`` train.
Per stage it prints the first step's time (compilation, autotuning), the tokens/s after it, the
peak memory (CUDA: allocated by torch; CPU: the process's peak RSS) and how long the preset's
token counts would take at that rate. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=None)


def smollm2_like_teacher(num_layers: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM with SmolLM2-135M's config (``num_layers`` layers), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": num_layers})
    with torch.device(device):
        return LlamaForCausalLM(config).float().eval()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def probe_target(teacher: torch.nn.Module, target: str, args: argparse.Namespace,
                 device: torch.device) -> dict[str, dict]:
    """Stage 1 and stage 2 of ``target`` on ``teacher``: {stage: summary of the training run}."""
    from linmix.convert import attention_transfer, build_student, distill, layer_targets, stage1_parameters
    from linmix.convert.data import lm_batch
    from linmix.convert.targets import student_mixers
    from linmix.train import TrainConfig

    n = teacher.config.num_hidden_layers
    targets = layer_targets(n, target)
    student = build_student(teacher, targets)
    mixers = student_mixers(student, targets)
    steps = 1 + args.steps   # the first step warms up (compilation, autotuning)
    tokens = torch.randint(0, teacher.config.vocab_size, (steps * args.batch_size, args.seq_len))
    data = lm_batch(tokens)

    def config(seed: int) -> TrainConfig:
        return TrainConfig(lr=1e-3, weight_decay=0.0, max_steps=steps, batch_size=args.batch_size, device=str(device),
                           bf16=args.bf16, progress=False, seed=seed, log_every=steps)

    results = {}
    reset_peak(device)
    params = [p for i, mixer in mixers.items() for p in stage1_parameters(targets[i], mixer)]
    stage1 = attention_transfer(teacher, mixers, data, config(0), params=params)["summary"]
    results["stage1"] = {**stage1, "peak_gib": peak_memory_gib(device)}
    reset_peak(device)
    student, history = distill(student, teacher, data, config(1), loss="kl", lora_rank=8)
    results["stage2"] = {**history[-1], "peak_gib": peak_memory_gib(device)}
    del student, mixers
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="lolcats",
                        help="target mixer, or several comma-separated (e.g. lolcats,gated_deltanet)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"],
                        help="teacher layers, all converted (default: SmolLM2-135M's 30)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage after the warm-up step")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast (CUDA)")
    parser.add_argument("--plan-tokens", type=float, default=10e6,
                        help="tokens per stage to show the time of (default: the GPU preset's 10M)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    from linmix.convert.cli import CONVERTIBLE

    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    unknown = [t for t in targets if t not in CONVERTIBLE]
    if unknown or not targets:
        parser.error(f"--target: expected one or more of {list(CONVERTIBLE)}, got {args.target!r}")
    if args.layers < 1 or args.seq_len < 2 or args.batch_size < 1 or args.steps < 1:
        parser.error("--layers, --batch-size and --steps must be >= 1 and --seq-len >= 2")
    device = torch.device(args.device)
    torch.manual_seed(0)

    start = time.perf_counter()
    teacher = smollm2_like_teacher(args.layers, device)
    params = sum(p.numel() for p in teacher.parameters())
    print(f"teacher: random SmolLM2-135M-shaped Llama, {args.layers} layers, {params / 1e6:.1f}M parameters, "
          f"built in {time.perf_counter() - start:.1f} s; B={args.batch_size} T={args.seq_len}, "
          f"{'bf16 autocast' if args.bf16 and device.type == 'cuda' else 'float32'} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    names = {"stage1": "stage 1 (attention transfer)", "stage2": "stage 2 (KL distillation, LoRA 8)"}
    print("| target | stage | first step s | tokens/s after it | peak memory GiB | "
          f"{args.plan_tokens / 1e6:g}M tokens would take |")
    print("|---|---|---|---|---|---|")
    results: dict[str, dict] = {}
    for target in targets:
        results[target] = probe_target(teacher, target, args, device)
        for stage, r in results[target].items():
            rate = r["tokens_per_s_after_first"]
            print(f"| {target} | {names[stage]} | {r['first_step_s']:.2f} | {rate:,.0f} | {r['peak_gib']:.2f} | "
                  f"{args.plan_tokens / rate:,.0f} s |", flush=True)
        gc.collect()
    print(f"total probe time {time.perf_counter() - start:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device),
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
