#!/usr/bin/env python
"""Pretraining throughput benchmark: tokens/s, step time, MFU and peak memory.

    python bench/pretrain.py                                  # fp32 and bf16 on CPU, ~2-3 min on 2 cores
    python bench/pretrain.py --precision bf16 --steps 30 --profile
    python bench/pretrain.py --device cuda --steps 50 --warmup 10 --json out.json

It prints figures and never asserts: timings depend on the machine.

1. The machine's own matmul peak: median GFLOP/s of a large square `torch.mm` (2048 x 2048
   by default) in fp32 and in bf16, so MFU is measured against what this machine can
   actually do, not a datasheet.
2. The nanoGPT shakespeare-char shape: 6 layers, 6 heads, width 384, context 256, batch 8,
   vocab 65, tied embeddings (nanoGPT ties wte and lm_head), ~10.6M parameters. Random
   tokens. One training step is exactly what `llmtrain/stages/pretrain.py` does: forward
   under `dist.autocast`, `lm_loss`, backward, `optimizer_step` (clip 1.0, AdamW from
   `build_optimizer`). Warm-up steps, then the median of the timed steps.
3. Per precision: tokens/s, step time (and its forward / backward / optimizer split), MFU
   = 6 N tokens/s / matmul peak of that precision (bf16 also against the fp32 peak), peak
   memory (`dist.peak_memory_mb`: max RSS on CPU, so each precision runs in its own
   subprocess unless --in-process), and the ratio to nanoGPT's figures on the reference
   machine.
4. --profile: torch.profiler over one training step per precision, top ops by self CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmtrain import dist  # noqa: E402
from llmtrain.config import ModelConfig, OptimConfig  # noqa: E402
from llmtrain.losses import lm_loss  # noqa: E402
from llmtrain.model import Transformer  # noqa: E402
from llmtrain.training import build_optimizer, optimizer_step  # noqa: E402

# nanoGPT (karpathy/nanoGPT, train_shakespeare_char shape, same batch/context) measured on the
# reference machine: 2 cores AMD EPYC Zen1 (AVX2), torch CPU build.
NANOGPT_TOKENS_PER_S = {"fp32": 2440.0, "bf16": 4670.0}
NANOGPT_FP32_PEAK_GFLOPS = 250.0  # its fp32 MFU there: ~62% of this
BF16_TARGET_X = 1.3  # target: bf16 tokens/s >= 1.3 x nanoGPT's bf16


def sync(device: torch.device) -> None:
    dist.cuda_sync(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int, warmup: int = 2) -> float:
    """Median GFLOP/s of an n x n x n torch.mm (2 n^3 FLOPs) in `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.heads, max_seq_len=args.ctx, tie_embeddings=not args.untied)


def bench_precision(args, precision: str) -> dict:
    """Build the model and optimizer, run warm-up + timed steps (and a profiled step)."""
    device = dist.pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(model_config(args)).to(device)
    optimizer = build_optimizer(model, OptimConfig(impl=args.optim_impl), device)
    train_model = torch.compile(model) if args.compile else model
    model.train()
    n_params = model.num_params()

    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, args.vocab, (args.batch, args.ctx + 1), generator=g) for _ in range(4)]

    def step(i: int, phases: list | None = None) -> float:
        xy = data[i % len(data)]
        x, y = xy[:, :-1].to(device), xy[:, 1:].to(device)
        t0 = time.perf_counter()
        with torch.profiler.record_function("## forward+loss"):
            with dist.autocast(device, precision):
                loss = lm_loss(train_model(x), y)
        if phases is not None:
            sync(device)
        t1 = time.perf_counter()
        with torch.profiler.record_function("## backward"):
            loss.backward()
        if phases is not None:
            sync(device)
        t2 = time.perf_counter()
        with torch.profiler.record_function("## optimizer_step"):
            optimizer_step(model, optimizer, args.grad_clip)  # returns a float: syncs
        t3 = time.perf_counter()
        if phases is not None:
            phases.append((t1 - t0, t2 - t1, t3 - t2))
        return float(loss.detach())

    t_warm = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    t_warm = time.perf_counter() - t_warm
    times, phases, losses = [], [], []
    for i in range(args.steps):
        t = time.perf_counter()
        losses.append(step(args.warmup + i, phases))
        times.append(time.perf_counter() - t)

    step_s = statistics.median(times)
    tokens = args.batch * args.ctx
    res = dict(
        precision=precision, device=str(device), threads=torch.get_num_threads(), compile=args.compile,
        optim_impl=args.optim_impl, params=n_params, flops_per_token_6n=6 * n_params,
        flops_per_token_model=model.flops_per_token(args.ctx), tokens_per_step=tokens,
        warmup_s=t_warm, step_s_median=step_s, step_s_min=min(times), step_s_max=max(times),
        tokens_per_s=tokens / step_s,
        forward_s=statistics.median(p[0] for p in phases), backward_s=statistics.median(p[1] for p in phases),
        optimizer_s=statistics.median(p[2] for p in phases),
        loss_first=losses[0], loss_last=losses[-1],
    )
    res["peak_memory_mb"] = dist.peak_memory_mb(device)  # before profiling, which adds its own memory

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(args.warmup + args.steps)
        sort = "self_cpu_time_total" if device.type == "cpu" else "self_cuda_time_total"
        res["profile"] = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows)
        phase_rows = [e for e in prof.key_averages() if e.key.startswith("## ")]
        res["profile_phases_ms"] = {e.key[3:]: e.cpu_time_total / 1e3 for e in phase_rows}
    return res


def run_child(args, precision: str) -> dict:
    """Run one precision in a fresh process, so max RSS is that precision's own."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "res.json"
        argv = [a for a in sys.argv[1:]]
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_child", precision, "--_out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32,bf16")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per precision (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--profile", action="store_true", help="profile one step per precision, print top ops")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--optim-impl", default="auto", choices=["auto", "fused", "foreach", "for-loop"],
                    help="OptimConfig.impl passed to build_optimizer")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--mm-size", type=int, default=2048, help="square matmul size for the peak")
    ap.add_argument("--mm-reps", type=int, default=10)
    ap.add_argument("--in-process", action="store_true",
                    help="run every precision in this process (peak memory is then cumulative)")
    # the shape: nanoGPT shakespeare-char
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--untied", action="store_true", help="untied embeddings (nanoGPT ties them)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        res = bench_precision(args, args._child)
        Path(args._out).write_text(json.dumps(res))
        return

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in ("fp32", "bf16"):
            ap.error(f"unknown precision {p!r} (fp32, bf16)")
    device = dist.pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__} | device {device} | {torch.get_num_threads()} threads | "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()} | compile={args.compile} | "
          f"optim impl={args.optim_impl}")

    # 1. matmul peak (fp32 always: bf16 MFU is also reported against it)
    peaks = {}
    for p in sorted(set(precisions) | {"fp32"}, key=["fp32", "bf16"].index):
        dtype = torch.float32 if p == "fp32" else torch.bfloat16
        peaks[p] = matmul_peak(device, dtype, args.mm_size, args.mm_reps)
    print(f"matmul peak ({args.mm_size}x{args.mm_size} torch.mm, median of {args.mm_reps}): " +
          ", ".join(f"{p} {g:,.1f} GFLOP/s" for p, g in peaks.items()) +
          f"  (nanoGPT reference machine fp32: ~{NANOGPT_FP32_PEAK_GFLOPS:.0f})")

    c = model_config(args).resolved()
    print(f"shape: {c.n_layers} layers, {c.n_heads} heads (kv {c.n_kv_heads}), dim {c.dim}, ffn {c.ffn_dim}, "
          f"ctx {args.ctx}, batch {args.batch}, vocab {c.vocab_size}, "
          f"{'tied' if c.tie_embeddings else 'untied'} embeddings; {args.batch * args.ctx:,} tokens/step; "
          f"{args.warmup} warm-up + {args.steps} timed steps per precision")

    # 2. the training steps
    results = {}
    for p in precisions:
        res = bench_precision(args, p) if args.in_process else run_child(args, p)
        results[p] = res
        n, tps = res["params"], res["tokens_per_s"]
        mfu = 6 * n * tps / (peaks[p] * 1e9)
        res["mfu"] = mfu
        res["matmul_peak_gflops"] = peaks[p]
        res["achieved_gflops_6n"] = 6 * n * tps / 1e9
        res["achieved_gflops_model"] = res["flops_per_token_model"] * tps / 1e9
        lines = [
            f"\n[{p}] {n / 1e6:.2f}M parameters",
            f"  tokens/s        {tps:,.0f}   (median step {1e3 * res['step_s_median']:.1f} ms; "
            f"min {1e3 * res['step_s_min']:.1f}, max {1e3 * res['step_s_max']:.1f}; warm-up {res['warmup_s']:.1f} s)",
            f"  step split      forward+loss {1e3 * res['forward_s']:.1f} ms | backward {1e3 * res['backward_s']:.1f} ms"
            f" | clip+AdamW {1e3 * res['optimizer_s']:.1f} ms",
            f"  achieved        {res['achieved_gflops_6n']:.1f} GFLOP/s (6N)"
            f", {res['achieved_gflops_model']:.1f} GFLOP/s (6N' + attention, model.flops_per_token)",
            f"  MFU             {pct(mfu)} of {p} matmul peak {peaks[p]:.1f} GFLOP/s",
        ]
        if p == "bf16":
            res["mfu_vs_fp32_peak"] = 6 * n * tps / (peaks["fp32"] * 1e9)
            lines.append(f"  MFU vs fp32     {pct(res['mfu_vs_fp32_peak'])} of fp32 matmul peak {peaks['fp32']:.1f} GFLOP/s")
        lines.append(f"  peak memory     {res['peak_memory_mb']:,.0f} MB ({'max RSS' if device.type == 'cpu' else 'allocated'})")
        lines.append(f"  loss            {res['loss_first']:.3f} -> {res['loss_last']:.3f} (random tokens: ~ln {c.vocab_size} = "
                     f"{torch.log(torch.tensor(float(c.vocab_size))):.3f})")
        print("\n".join(lines))
        if args.profile:
            ph = res["profile_phases_ms"]
            print(f"  profiled step ({p}): " + " | ".join(f"{k} {v:.1f} ms" for k, v in ph.items()))
            print(res["profile"])

    # 3. against nanoGPT
    print("\nagainst nanoGPT (same shape, reference machine: 2-core EPYC Zen1):")
    ref_n = results[precisions[0]]["params"]
    nano_mfu32 = 6 * ref_n * NANOGPT_TOKENS_PER_S["fp32"] / (NANOGPT_FP32_PEAK_GFLOPS * 1e9)
    print(f"  nanoGPT: fp32 {NANOGPT_TOKENS_PER_S['fp32']:,.0f} tokens/s (MFU ~{pct(nano_mfu32)} of "
          f"~{NANOGPT_FP32_PEAK_GFLOPS:.0f} GFLOP/s; {pct(6 * ref_n * NANOGPT_TOKENS_PER_S['fp32'] / (peaks['fp32'] * 1e9))}"
          f" of this machine's fp32 peak), bf16 autocast {NANOGPT_TOKENS_PER_S['bf16']:,.0f} tokens/s")
    print(f"  {'precision':<10}{'ours tok/s':>12}{'nanoGPT':>10}{'ratio':>8}   target")
    for p, res in results.items():
        tps, ref = res["tokens_per_s"], NANOGPT_TOKENS_PER_S[p]
        res["nanogpt_tokens_per_s"] = ref
        res["ratio_vs_nanogpt"] = tps / ref
        if p == "fp32":
            nano_mfu_here = 6 * res["params"] * ref / (peaks["fp32"] * 1e9)
            target = (f"MFU {pct(res['mfu'])} >= nanoGPT's {pct(nano_mfu32)} (ref peak) / "
                      f"{pct(nano_mfu_here)} (this peak): "
                      f"{'met' if res['mfu'] >= min(nano_mfu32, nano_mfu_here) else 'NOT met'}")
        else:
            goal = BF16_TARGET_X * ref
            target = f"tokens/s >= {BF16_TARGET_X}x = {goal:,.0f}: {'met' if tps >= goal else 'NOT met'} ({tps / goal:.2f}x of goal)"
        print(f"  {p:<10}{tps:>12,.0f}{ref:>10,.0f}{tps / ref:>8.2f}   {target}")

    if args.json:
        out = dict(torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                   matmul_peak_gflops=peaks, args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                   results=results)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
