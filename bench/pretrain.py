#!/usr/bin/env python
"""Pretraining throughput benchmark: tokens/s, step time, MFU and peak memory.

    python bench/pretrain.py                          # fp32 and bf16 on CPU (~2.5 min on 2 Zen1 cores)
    python bench/pretrain.py --precision fp32 --nanogpt --profile
    python bench/pretrain.py --device cuda --steps 50 --warmup 10 --json out.json

It prints figures and never asserts: timings depend on the machine (and on whatever else runs on
it: a warning is printed when other processes keep cores busy).

1. The machine's own matmul peak: median GFLOP/s of a large square `torch.mm` (2048^3 by
   default) in fp32 and bf16, in the layouts a @ b and a @ b.T (the best is the peak), so MFU
   is against what this machine actually does. A kernel too slow for 2048^3 (bf16 on a CPU
   without native bf16) is measured at the largest size that takes <= 0.5 s.
2. The nanoGPT shakespeare-char shape: 6 layers, 6 heads, width 384, context 256, batch 8,
   vocab 65, tied embeddings (nanoGPT ties wte and lm_head), 10.65M parameters, random tokens.
   One training step is exactly what `llmtrain/stages/pretrain.py` does: forward under
   `dist.autocast`, `lm_loss`, backward, `optimizer_step` (clip 1.0, AdamW from
   `build_optimizer`). Warm-up steps, then the median of the timed steps (--steps, cut short
   after --max-seconds).
3. Per precision: tokens/s, step time (forward / backward / optimizer split), MFU = 6 N
   tokens/s / matmul peak of that precision (and against the fp32 peak), peak memory
   (`dist.peak_memory_mb`: max RSS on CPU, so every run is its own subprocess unless
   --in-process), and ratios to nanoGPT: to the reference figures below and, with --nanogpt,
   to nanoGPT's model and step measured here (bench/nanogpt_ref.py).
4. --profile: torch.profiler over one training step per run, top ops by self CPU time.
5. Memory reuse: ours runs as the stages do, with `dist.keep_freed_memory()` (glibc keeps the
   pages a step frees for the next step); nanoGPT runs with glibc's defaults, as it ships,
   unless --nanogpt-keep-freed. Each run prints its page faults per step. --interleave and
   --in-process run both in one process, so both get the setting there (the label says so).
   LLMTRAIN_MALLOC=system leaves glibc's defaults for ours too (the figure before the setting).
6. --compile [both|ours|nanogpt]: torch.compile (inductor) for both models, as nanoGPT's
   train.py does by default, or for one. Every run compiles from cold (inductor's disk caches
   off, dynamo reset) unless --compile-cache, and prints what compiling cost (its warm-up time
   beyond as many steady steps) and tokens/s over a whole --amortize-steps run, compile
   included; the interleaved rounds give that run-long ratio too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # nanogpt_ref

import torch

from llmtrain import dist
from llmtrain.config import ModelConfig, OptimConfig
from llmtrain.losses import lm_loss
from llmtrain.model import Transformer
from llmtrain.training import build_optimizer, optimizer_step

try:
    import resource
except ImportError:  # Windows: no page-fault count
    resource = None

# nanoGPT (karpathy/nanoGPT, train_shakespeare_char shape, same batch/context) measured on the
# reference machine: 2 cores AMD EPYC Zen1 (AVX2), torch CPU build.
NANOGPT_TOKENS_PER_S = {"fp32": 2440.0, "bf16": 4670.0}
NANOGPT_FP32_PEAK_GFLOPS = 250.0  # its fp32 MFU there: ~62% of this
BF16_TARGET_X = 1.3  # target: bf16 tokens/s >= 1.3 x nanoGPT's bf16


def sync(device: torch.device) -> None:
    dist.cuda_sync(device)


def _mm_time(a, b, c, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int, max_rep_s: float = 0.5) -> dict:
    """Median GFLOP/s of an n x n x n torch.mm (2 n^3 FLOPs) in `dtype`, in two layouts:
    'nn' (a @ b, both row-major) and 'nt' (a @ b.T, nn.Linear's forward layout).

    Where a kernel is slow (bf16 on a CPU without native bf16 runs a scalar fallback at
    ~1 GFLOP/s, so one 2048^3 mm takes minutes), n is halved until one rep is projected to take
    at most `max_rep_s`, judged from a 256^3 probe. Returns {layout: (GFLOP/s, n)} and 'peak'.
    """
    out = {}
    for layout in ("nn", "nt"):
        m = n
        probe = 256
        a = torch.randn(probe, probe, device=device).to(dtype)
        b = torch.randn(probe, probe, device=device).to(dtype)
        bb = b.t() if layout == "nt" else b
        c = torch.empty(probe, probe, device=device, dtype=dtype)
        torch.mm(a, bb, out=c)
        sync(device)
        rate = 2 * probe**3 / _mm_time(a, bb, c, device, 3)
        while m > probe and 2 * m**3 / rate > max_rep_s:
            m //= 2
        a = torch.randn(m, m, device=device).to(dtype)
        b = torch.randn(m, m, device=device).to(dtype)
        bb = b.t() if layout == "nt" else b
        c = torch.empty(m, m, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, bb, out=c)
        sync(device)
        out[layout] = (2 * m**3 / _mm_time(a, bb, c, device, reps) / 1e9, m)
    out["peak"] = max(v[0] for v in out.values())
    return out


def native_bf16(device: torch.device) -> str:
    if device.type != "cpu":
        return "n/a"
    try:
        flags = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
                 "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported()}
    except (AttributeError, RuntimeError):  # private helpers: absent in some torch versions
        return "unknown"
    return ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items())


def busy_cores(window_s: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now (Linux /proc/stat, less this process's own
    CPU time: MKL/OpenMP threads spin a while after a matmul), else None."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        c0, w0 = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        t1, i1 = read()
        c1, w1 = time.process_time(), time.perf_counter()
    except OSError:
        return None
    busy = (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)
    return max(0.0, busy - (c1 - c0) / (w1 - w0))


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.heads, max_seq_len=args.ctx, tie_embeddings=not args.untied)


KEPT = {"malloc": False}  # whether this process called dist.keep_freed_memory() (and it took)


def keep_freed_memory(device: torch.device) -> None:
    if device.type == "cpu" and not KEPT["malloc"]:
        KEPT["malloc"] = dist.keep_freed_memory()


def page_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not say)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def build(args, which: str, device: torch.device):
    """(model, train_model, step_fn(x, y, precision) -> loss) for 'ours' or 'nanogpt'."""
    torch.manual_seed(0)
    if which == "ours" or args.nanogpt_keep_freed:
        keep_freed_memory(device)  # what dist.setup does for every stage on a CPU
    if which == "ours":
        model = Transformer(model_config(args)).to(device)
        optimizer = build_optimizer(model, OptimConfig(impl=args.optim_impl), device)
        train_model = torch.compile(model) if compiled(args, which) else model

        def fwd(x, y, precision):
            # exactly llmtrain/stages/pretrain.py's micro-step (grad_accum 1)
            with dist.autocast(device, precision):
                return lm_loss(train_model(x), y)

        def opt():
            optimizer_step(model, optimizer, args.grad_clip)  # returns a float: syncs
    else:
        from nanogpt_ref import GPT, GPTConfig

        model = GPT(GPTConfig(block_size=args.ctx, vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                              n_embd=args.dim, dropout=args.nanogpt_dropout, bias=False)).to(device)
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.type)
        train_model = torch.compile(model) if compiled(args, which) else model

        def fwd(x, y, precision):
            with dist.autocast(device, precision):
                return train_model(x, y)[1]

        def opt():
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
    model.train()
    return model, fwd, opt


def compiled(args, which: str) -> bool:
    """Whether `which` ('ours' or 'nanogpt') runs under torch.compile (--compile)."""
    return args.compile in ("both", which)


def cold_compiles(args) -> None:
    """Unless --compile-cache: inductor's on-disk caches off and dynamo's in-process ones
    emptied, so every run (and every interleaved round) pays the whole compile, as on a fresh
    machine (a warm cache hides most of it; a second model of the same class in one process
    would reuse the first one's graphs)."""
    if args.compile and not args.compile_cache:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
        torch._dynamo.reset()


def compile_s(first_steps: list[float], step_s: float) -> float:
    """What compiling cost: the warm-up steps' time beyond that of as many steady steps."""
    return max(0.0, sum(first_steps) - len(first_steps) * step_s)


def amortized(tokens: int, step_s: float, compile_time: float, steps: int) -> float:
    """tokens/s of a whole run of `steps` steps, compile included."""
    return steps * tokens / (compile_time + steps * step_s)


def n_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


class Runner:
    """One model and optimizer (ours or nanoGPT's) and its training step on fixed random data."""

    def __init__(self, args, precision: str, which: str, device: torch.device):
        self.model, self.fwd, self.opt = build(args, which, device)
        self.precision, self.which, self.device = precision, which, device
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, args.vocab, (args.batch, args.ctx + 1), generator=g) for _ in range(4)]

    def step(self, i: int, phases: list | None = None, faults: list | None = None) -> float:
        xy = self.data[i % len(self.data)]
        x, y = xy[:, :-1].contiguous().to(self.device), xy[:, 1:].contiguous().to(self.device)
        f0 = page_faults()
        t0 = time.perf_counter()
        with torch.profiler.record_function("## forward+loss"):
            loss = self.fwd(x, y, self.precision)
        sync(self.device)
        t1 = time.perf_counter()
        with torch.profiler.record_function("## backward"):
            loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        with torch.profiler.record_function("## optimizer_step"):
            self.opt()
        t3 = time.perf_counter()
        if phases is not None:
            phases.append((t1 - t0, t2 - t1, t3 - t2))
        if faults is not None:
            faults.append(page_faults() - f0)
        return float(loss.detach())


def interleaved(args, precision: str) -> dict:
    """Ours and nanoGPT in one process, one step each in turn, so every slow spell of a shared
    machine hits both alike: per-model median step and the median of the per-pair ratios.
    One process has one malloc: ours builds first and keeps freed memory for both."""
    device = dist.pick_device(args.device)
    cold_compiles(args)
    runners = [Runner(args, precision, w, device) for w in ("ours", "nanogpt")]
    warm: dict = {"ours": [], "nanogpt": []}
    for i in range(max(1, args.warmup)):
        for r in runners:
            t = time.perf_counter()
            r.step(i)
            warm[r.which].append(time.perf_counter() - t)
    times: dict = {"ours": [], "nanogpt": []}
    faults: dict = {"ours": [], "nanogpt": []}
    for i in range(args.steps):
        for r in (runners if i % 2 == 0 else runners[::-1]):  # neither always goes first
            t = time.perf_counter()
            r.step(args.warmup + i, faults=faults[r.which])
            times[r.which].append(time.perf_counter() - t)
    tokens = args.batch * args.ctx
    pairs = [n / o for o, n in zip(times["ours"], times["nanogpt"])]
    comp = {w: compile_s(warm[w], statistics.median(times[w])) for w in warm}
    whole = {w: amortized(tokens, statistics.median(times[w]), comp[w], args.amortize_steps) for w in warm}
    return {"precision": precision, "steps": args.steps,
            "compiled": {w: compiled(args, w) for w in warm}, "compile_s": comp,
            "amortize_steps": args.amortize_steps, "tokens_per_s_over_run": whole,
            "ratio_over_run": whole["ours"] / whole["nanogpt"],
            "ours_tokens_per_s": tokens / statistics.median(times["ours"]),
            "nanogpt_tokens_per_s": tokens / statistics.median(times["nanogpt"]),
            "ratio_of_medians": statistics.median(times["nanogpt"]) / statistics.median(times["ours"]),
            "ratio_pairs_median": statistics.median(pairs), "ratio_pairs_worst": min(pairs), "malloc_kept": KEPT["malloc"],
            "page_faults_per_step": {w: statistics.median(f) for w, f in faults.items()}}


def bench_precision(args, precision: str, which: str = "ours") -> dict:
    """Build the model and optimizer, run warm-up + timed steps (and a profiled step)."""
    device = dist.pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cold_compiles(args)
    runner = Runner(args, precision, which, device)
    model, step = runner.model, runner.step
    n = n_params(model)
    # nanoGPT's own count (and MFU) leaves out the position table; so does 6N here
    n_6n = model.get_num_params() if which == "nanogpt" else n

    # warm-up: at least one step; stop early past half the time budget (slow bf16 kernels)
    t_warm, n_warm, warm_steps = time.perf_counter(), 0, []
    while n_warm < max(1, args.warmup):
        t = time.perf_counter()
        step(n_warm)
        warm_steps.append(time.perf_counter() - t)
        n_warm += 1
        if time.perf_counter() - t_warm > args.max_seconds / 2:
            break
    t_warm = time.perf_counter() - t_warm
    # timed steps: --steps, but stop past --max-seconds once 2 are done (1 if a step alone takes that long)
    times, phases, losses, faults = [], [], [], []
    t_all = time.perf_counter()
    for i in range(args.steps):
        t = time.perf_counter()
        losses.append(step(n_warm + i, phases, faults))
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_all > args.max_seconds and (len(times) >= 2 or times[0] > args.max_seconds):
            break

    step_s = statistics.median(times)
    tokens = args.batch * args.ctx
    res = {
        "model": which, "precision": precision, "device": str(device), "threads": torch.get_num_threads(), "compile": compiled(args, which),
        "optim_impl": args.optim_impl if which == "ours" else "torch default", "params": n, "params_6n": n_6n,
        "flops_per_token_model": model.flops_per_token(args.ctx) if which == "ours" else None,
        "tokens_per_step": tokens, "warmup_steps": n_warm, "warmup_s": t_warm, "timed_steps": len(times),
        "compile_s": compile_s(warm_steps, step_s), "amortize_steps": args.amortize_steps,
        "step_s_median": step_s, "step_s_min": min(times), "step_s_max": max(times), "tokens_per_s": tokens / step_s,
        "forward_s": statistics.median(p[0] for p in phases), "backward_s": statistics.median(p[1] for p in phases),
        "optimizer_s": statistics.median(p[2] for p in phases), "loss_first": losses[0], "loss_last": losses[-1],
        "page_faults_per_step": statistics.median(faults), "malloc_kept": KEPT["malloc"],
    }
    res["tokens_per_s_over_run"] = amortized(tokens, step_s, res["compile_s"], args.amortize_steps)
    res["peak_memory_mb"] = dist.peak_memory_mb(device)  # before profiling, which adds its own memory

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(n_warm + len(times))
        sort = "self_cpu_time_total" if device.type == "cpu" else "self_cuda_time_total"
        avgs = prof.key_averages()
        res["profile_phases_ms"] = {e.key[3:]: e.cpu_time_total / 1e3 for e in avgs if e.key.startswith("## ")}
        res["profile_top"] = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                              for e in sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:args.profile_rows]]
        res["profile"] = avgs.table(sort_by=sort, row_limit=args.profile_rows)
    return res


def run_child(args, precision: str, which: str) -> dict:
    """Run one precision in a fresh process, so max RSS is that run's own."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "res.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
               "--_child", f"{which}:{precision}", "--_out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(res: dict, peaks: dict, device: torch.device, vocab: int, profile: bool) -> None:
    p, n, tps = res["precision"], res["params_6n"], res["tokens_per_s"]
    peak = peaks[p]["peak"]
    res["matmul_peak_gflops"] = peak
    res["achieved_gflops_6n"] = 6 * n * tps / 1e9
    res["mfu"] = 6 * n * tps / (peak * 1e9)
    res["mfu_vs_fp32_peak"] = 6 * n * tps / (peaks["fp32"]["peak"] * 1e9)
    name = "llmtrain" if res["model"] == "ours" else "nanoGPT (bench/nanogpt_ref.py)"
    lines = [
        f"\n[{name} | {p}] {res['params'] / 1e6:.2f}M parameters (6N uses {n / 1e6:.2f}M)",
        (f"  tokens/s        {tps:,.0f}   (median step {1e3 * res['step_s_median']:.1f} ms over {res['timed_steps']} steps;"
         f" min {1e3 * res['step_s_min']:.1f}, max {1e3 * res['step_s_max']:.1f};"
         f" {res['warmup_steps']} warm-up steps {res['warmup_s']:.1f} s)"),
        *([f"  compile         {res['compile_s']:.1f} s (warm-up beyond steady steps); tokens/s over a "
           f"{res['amortize_steps']:,}-step run, compile included: {res['tokens_per_s_over_run']:,.0f}"]
          if res["compile"] else []),
        (f"  step split      forward+loss {1e3 * res['forward_s']:.1f} ms | backward {1e3 * res['backward_s']:.1f} ms"
         f" | clip+AdamW {1e3 * res['optimizer_s']:.1f} ms"),
        f"  achieved        {res['achieved_gflops_6n']:.1f} GFLOP/s (6N)" + (
            f", {res['flops_per_token_model'] * tps / 1e9:.1f} GFLOP/s (model.flops_per_token: + attention)"
            if res.get("flops_per_token_model") else ""),
        f"  MFU             {pct(res['mfu'])} of {p} matmul peak {peak:.1f} GFLOP/s",
    ]
    if p != "fp32":
        lines.append(f"  MFU vs fp32     {pct(res['mfu_vs_fp32_peak'])} of fp32 matmul peak {peaks['fp32']['peak']:.1f} GFLOP/s")
    lines.append(f"  peak memory     {res['peak_memory_mb']:,.0f} MB ({'max RSS' if device.type == 'cpu' else 'allocated'})")
    if device.type == "cpu":
        lines.append(f"  page faults     {res['page_faults_per_step']:,.0f} per step (minor; glibc malloc "
                     f"{'keeps freed memory: dist.keep_freed_memory' if res['malloc_kept'] else 'defaults'})")
    lines.append(f"  loss            {res['loss_first']:.3f} -> {res['loss_last']:.3f} (random tokens: ln {vocab} = "
                 f"{math.log(vocab):.3f})")
    print("\n".join(lines))
    if profile:
        print("  profiled step: " + " | ".join(f"{k} {v:.1f} ms" for k, v in res["profile_phases_ms"].items()))
        print(res["profile"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32,bf16")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="per run: stop timing after this long once 2 steps are done; warm-up stops after half")
    ap.add_argument("--compile", nargs="?", const="both", choices=["both", "ours", "nanogpt"],
                    help="torch.compile both models (nanoGPT's train.py compiles by default), or only one; every run "
                         "compiles from cold unless --compile-cache, and the compile time is printed")
    ap.add_argument("--compile-cache", action="store_true",
                    help="let inductor use its on-disk caches (a second run then compiles in seconds)")
    ap.add_argument("--amortize-steps", type=int, default=5000,
                    help="the run length for 'tokens/s over the run, compile included' (nanoGPT's shakespeare-char: 5000)")
    ap.add_argument("--profile", action="store_true", help="profile one step per run, print top ops by self CPU time")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--nanogpt", action="store_true",
                    help="also measure nanoGPT's model and step (bench/nanogpt_ref.py) on this machine")
    ap.add_argument("--nanogpt-dropout", type=float, default=0.0, help="shakespeare-char trains with 0.2")
    ap.add_argument("--nanogpt-keep-freed", action="store_true",
                    help="nanoGPT's runs also with dist.keep_freed_memory() (ours always, as the stages)")
    ap.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--optim-impl", default="auto", choices=["auto", "fused", "foreach", "for-loop"],
                    help="OptimConfig.impl passed to build_optimizer")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--mm-size", type=int, default=2048, help="square matmul size for the peak")
    ap.add_argument("--mm-reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="times every run is repeated, alternating ours and nanoGPT; ratios are per round")
    ap.add_argument("--interleave", action="store_true",
                    help="with --nanogpt: also run both in one process, one step each in turn (--steps pairs, --rounds "
                         "times; --max-seconds does not cut it short)")
    ap.add_argument("--in-process", action="store_true",
                    help="run everything in this process (peak memory is then cumulative)")
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
        which, precision = args._child.split(":")
        Path(args._out).write_text(json.dumps(bench_precision(args, precision, which)))
        return

    for name in ("rounds", "steps", "amortize_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.compile == "nanogpt" and not args.nanogpt:
        ap.error("--compile nanogpt compiles nanoGPT's model: add --nanogpt")
    if args.interleave and not args.nanogpt:
        ap.error("--interleave alternates ours with nanoGPT: add --nanogpt")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in ("fp32", "bf16"):
            ap.error(f"unknown precision {p!r} (fp32, bf16)")
    device = dist.pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    print(f"torch {torch.__version__} | device {device} | {torch.get_num_threads()} threads | "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()} | native bf16: {native_bf16(device)} | "
          f"compile={args.compile} | optim impl={args.optim_impl}")

    busy = busy_cores()
    if busy is not None and busy > 0.3:
        print(f"WARNING: {busy:.1f} of {os.cpu_count()} cores busy before starting: other processes compete, "
              f"so the figures below are low and noisy")

    # 1. matmul peak (fp32 always: every MFU is also reported against it)
    peaks = {}
    for p in sorted(set(precisions) | {"fp32"}, key=["fp32", "bf16"].index):
        peaks[p] = matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16, args.mm_size, args.mm_reps)
        parts = ", ".join(f"{lay} {v[0]:,.1f} GFLOP/s (n={v[1]})" for lay, v in peaks[p].items() if lay != "peak")
        print(f"matmul peak {p:<5} {peaks[p]['peak']:,.1f} GFLOP/s   [median of {args.mm_reps} torch.mm; {parts}; "
              f"nn = a @ b, nt = a @ b.T]")
    print(f"  (nanoGPT reference machine: fp32 peak ~{NANOGPT_FP32_PEAK_GFLOPS:.0f} GFLOP/s)")

    c = model_config(args).resolved()
    print(f"shape: {c.n_layers} layers, {c.n_heads} heads (kv {c.n_kv_heads}), dim {c.dim}, ffn {c.ffn_dim} (SwiGLU), "
          f"ctx {args.ctx}, batch {args.batch}, vocab {c.vocab_size}, "
          f"{'tied' if c.tie_embeddings else 'untied'} embeddings; {args.batch * args.ctx:,} tokens/step; "
          f"{args.warmup} warm-up + up to {args.steps} timed steps per run (<= ~{args.max_seconds:.0f} s timed)")

    # 2. the training steps: every run once per round (--rounds), alternating ours and nanoGPT, so a
    # slow spell of a shared machine hits both; ratios are taken within a round
    runs = [("ours", p) for p in precisions] + ([("nanogpt", p) for p in precisions] if args.nanogpt else [])
    rounds: list[dict] = []
    for rnd in range(args.rounds):
        got = {}
        for which, p in runs:
            busy = busy_cores()
            res = bench_precision(args, p, which) if args.in_process else run_child(args, p, which)
            res["busy_cores_before"], res["round"] = busy, rnd + 1
            if busy is not None and busy > 0.3:
                print(f"\nWARNING: {busy:.1f} cores busy with other processes before this run")
            got[f"{which}:{p}"] = res
            if args.rounds > 1:
                print(f"\n--- round {rnd + 1} of {args.rounds}", end="")
            report(res, peaks, device, c.vocab_size, args.profile and rnd == 0)
        rounds.append(got)
    results = {k: median_run([r[k] for r in rounds]) for k in rounds[0]}

    # 3. against nanoGPT
    inter = {}
    if args.nanogpt and args.interleave:
        for p in precisions:
            inter[p] = got = [interleaved(args, p) for _ in range(args.rounds)]
            for i, r in enumerate(got):
                print(f"\n[interleaved | {p} | round {i + 1}] ours and nanoGPT in one process, one step each in turn, "
                      f"{r['steps']} steps each: ours {r['ours_tokens_per_s']:,.0f} tokens/s, nanoGPT "
                      f"{r['nanogpt_tokens_per_s']:,.0f}; ours/nanoGPT {r['ratio_of_medians']:.2f} (per pair: median "
                      f"{r['ratio_pairs_median']:.2f}, worst {r['ratio_pairs_worst']:.2f}); page faults per step: ours "
                      f"{r['page_faults_per_step']['ours']:,.0f}, nanoGPT {r['page_faults_per_step']['nanogpt']:,.0f} "
                      f"(malloc {'keeps freed memory' if r['malloc_kept'] else 'defaults'})", end="")
                if any(r["compiled"].values()):
                    print(f"; compiled: {', '.join(w for w, c in r['compiled'].items() if c)}, compile s: ours "
                          f"{r['compile_s']['ours']:.1f}, nanoGPT {r['compile_s']['nanogpt']:.1f}; over a "
                          f"{args.amortize_steps:,}-step run, compile included, ours/nanoGPT {r['ratio_over_run']:.2f}",
                          end="")
            ratios = [r["ratio_of_medians"] for r in got]
            print(f"\n[interleaved | {p}] ours/nanoGPT over {len(got)} round(s): median {statistics.median(ratios):.2f}, "
                  f"worst {min(ratios):.2f}")
    print("\nagainst nanoGPT, same shape:")
    n_ours = results[f"ours:{precisions[0]}"]["params_6n"]
    ref_mfu = {p: 6 * n_ours * v / (NANOGPT_FP32_PEAK_GFLOPS * 1e9) for p, v in NANOGPT_TOKENS_PER_S.items()}
    print(f"  reference figures (given, another machine and day; context only): fp32 "
          f"{NANOGPT_TOKENS_PER_S['fp32']:,.0f} tokens/s = MFU {pct(ref_mfu['fp32'])} of ~{NANOGPT_FP32_PEAK_GFLOPS:.0f} "
          f"GFLOP/s; bf16 autocast {NANOGPT_TOKENS_PER_S['bf16']:,.0f} tokens/s")
    hdr = f"  {'precision':<10}{'ours tok/s':>11}{'MFU':>7}{'ref tok/s':>11}{'ours/ref':>9}"
    if args.nanogpt:
        hdr += f"{'nanoGPT here':>14}{'MFU':>7}{'ours/here per round':>28}{'median':>8}{'worst':>7}"
    print(hdr + ("   target" if args.nanogpt else ""))
    for p in precisions:
        res = results[f"ours:{p}"]
        tps, ref = res["tokens_per_s"], NANOGPT_TOKENS_PER_S[p]
        res["ratio_vs_nanogpt_reference"] = tps / ref
        row = f"  {p:<10}{tps:>11,.0f}{pct(res['mfu']):>7}{ref:>11,.0f}{tps / ref:>9.2f}"
        if args.nanogpt:
            nano = results[f"nanogpt:{p}"]
            per_round = [r[f"ours:{p}"]["tokens_per_s"] / r[f"nanogpt:{p}"]["tokens_per_s"] for r in rounds]
            res["ratio_vs_nanogpt_here_per_round"] = per_round
            res["ratio_vs_nanogpt_here"] = statistics.median(per_round)
            row += (f"{nano['tokens_per_s']:>14,.0f}{pct(nano['mfu']):>7}"
                    f"{' '.join(f'{x:.2f}' for x in per_round):>28}{statistics.median(per_round):>8.2f}{min(per_round):>7.2f}")
            if p == "fp32":
                target, met = "tokens/s >= nanoGPT's", min(per_round) >= 1.0
            else:
                target, met = f"tokens/s >= {BF16_TARGET_X}x nanoGPT's", min(per_round) >= BF16_TARGET_X
            row += f"   {target} in every round: {'met' if met else 'NOT met'}"
        print(row)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")

    if args.json:
        out = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                   "matmul_peak": peaks, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "nanogpt_reference": {"tokens_per_s": NANOGPT_TOKENS_PER_S, "fp32_peak_gflops": NANOGPT_FP32_PEAK_GFLOPS},
                   "results": results, "rounds": rounds, "interleaved": inter}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
