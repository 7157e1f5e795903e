#!/usr/bin/env python
"""The GPU benchmark: one prepared script for a machine with one CUDA GPU, at most ~8 minutes.

    python bench/gpu.py --json gpu.json            # on the GPU machine
    python bench/gpu.py --smoke --json smoke.json  # a tiny CPU run of the same code (what CI can check)

It measures, on random weights and tokens (speed does not depend on them):
 1. pretraining of a 124M-parameter Llama (configs/pretrain-124m.yaml: width 768, 12 layers,
    12 heads, context 1024, vocab 32768, tied embeddings), bf16 autocast, fused AdamW, flash
    SDPA: tokens/s, step time, MFU (6N + attention FLOPs per token, against the GPU's dense
    bf16 peak from its name and against the bf16 matmul peak measured here), peak memory;
    without and with `torch.compile`;
 2. rollout tokens/s of our batched KV-cache generation on that model (bf16 weights, greedy,
    no early stop), and of `transformers.generate` on the same weights when it is installed;
    then the decoder's static-cache loop with its decode step under
    torch.compile(mode="reduce-overhead") (CUDA graphs), first call (compile) apart, tokens
    checked against eager;
 3. one PPO iteration (llmtrain.stages.ppo on a 124M policy and reward model): seconds per
    iteration (median after the first) and peak memory.
Figures are printed and written to --json; nothing is asserted. Each part is cut short when
its time budget is spent (--budget seconds for the whole script).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmtrain import dist  # noqa: E402
from llmtrain.config import ModelConfig, OptimConfig  # noqa: E402
from llmtrain.losses import lm_loss  # noqa: E402
from llmtrain.model import Transformer  # noqa: E402
from llmtrain.training import build_optimizer, optimizer_step  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def sync(device):
    dist.cuda_sync(device)


def spec_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def matmul_peak(device, dtype, n: int, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts)


def peak_mb(device) -> float:
    return dist.peak_memory_mb(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def pretrain_bench(cfg: ModelConfig, batch: int, device, precision: str, compile_: bool, steps: int, warmup: int,
                   budget_s: float) -> dict:
    """llmtrain/stages/pretrain.py's step (forward under autocast, lm_loss, backward,
    optimizer_step with clipping and fused AdamW) on random tokens."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=3e-4), device)
    train_model = torch.compile(model) if compile_ else model
    data = torch.randint(0, cfg.vocab_size, (4, batch, cfg.max_seq_len + 1), device=device)
    reset_peak(device)

    def step(i):
        xy = data[i % 4]
        with dist.autocast(device, precision):
            loss = lm_loss(train_model(xy[:, :-1]), xy[:, 1:])
        loss.backward()
        optimizer_step(model, optimizer, 1.0)
        return loss

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    t_all = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_all > budget_s and len(times) >= 3:
            break
    step_s = statistics.median(times)
    tokens = batch * cfg.max_seq_len
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    fpt = model.flops_per_token(cfg.max_seq_len)
    out = {"compile": compile_, "precision": precision, "params": n, "batch": batch, "ctx": cfg.max_seq_len,
           "flops_per_token": fpt, "warmup_s": warm_s, "timed_steps": len(times), "step_s_median": step_s,
           "tokens_per_s": tokens / step_s, "peak_memory_mb": peak_mb(device)}
    del model, optimizer, train_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def rollout_bench(cfg: ModelConfig, batch: int, prompt_len: int, new: int, device, repeats: int) -> dict:
    from llmtrain.generate import SamplingConfig, generate

    torch.manual_seed(0)
    model = Transformer(cfg).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len)).tolist()
    s = SamplingConfig(max_new_tokens=new, temperature=0.0)

    def timed(fn):
        fn()
        ts = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
        return batch * new / statistics.median(ts)

    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new,
           "ours_tokens_per_s": timed(lambda: generate(model, prompts, s, pad_id=0))}
    try:
        import transformers

        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.hf_config()))
        hf.load_state_dict(model.state_dict(), strict=False)
        hf.tie_weights()
        hf.to(device, next(model.parameters()).dtype).eval()
        ids = torch.tensor(prompts, device=device)

        def run_hf():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
        out["transformers_tokens_per_s"] = timed(run_hf)
        out["ratio"] = out["ours_tokens_per_s"] / out["transformers_tokens_per_s"]
    except ImportError:
        out["transformers_tokens_per_s"] = None
    return out


def graphed_rollout_bench(cfg: ModelConfig, batch: int, prompt_len: int, new: int, device,
                          compile_kwargs: dict) -> dict:
    """Greedy decoding on the decoder's static KV cache, its decode step compiled with
    torch.compile(**compile_kwargs) (on CUDA mode="reduce-overhead", CUDA graphs: one launch
    per step; --smoke traces with backend="eager", no C++ compile) against the same loop
    eager; the first compiled call (compiling and recording included) is reported apart from
    the next, and the tokens are checked against the eager ones."""
    from llmtrain.generate import compiled_static_step, greedy_static
    from llmtrain.model.decoder import Decoder

    torch.manual_seed(0)
    model = Transformer(cfg).to(device).eval()
    dec = Decoder(model, torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len)).tolist()

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t, out

    greedy_static(dec, prompts, new)  # warm-up
    eager_s, eager = timed(lambda: greedy_static(dec, prompts, new))
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new, "eager_tokens_per_s": batch * new / eager_s}
    try:
        step, cache = compiled_static_step(dec, batch, prompt_len + new, **compile_kwargs)
        first_s, first = timed(lambda: greedy_static(dec, prompts, new, step=step, cache=cache))
        graphed_s, graphed = timed(lambda: greedy_static(dec, prompts, new, step=step, cache=cache))
        out.update(first_call_s=first_s, graphed_tokens_per_s=batch * new / graphed_s,
                   speedup=eager_s / graphed_s, same_tokens=first == eager and graphed == eager)
    except Exception as e:  # report, do not lose the other figures
        out["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def ppo_bench(cfg: ModelConfig, device, iters: int, rollout: int, new: int) -> dict:
    from llmtrain import checkpoint
    from llmtrain.config import PPOConfig, load_config
    from llmtrain.metrics import read_metrics
    from llmtrain.model.heads import ScoreModel
    from llmtrain.stages import ppo
    from llmtrain.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        text = (REPO / "data/corpus/chitchat.txt").read_text()[:300_000]
        tok = train_tokenizer(iter([text]), 2048, root / "tokenizer.json")
        c = ModelConfig(**{**vars(cfg), "vocab_size": max(cfg.vocab_size, tok.vocab_size)})
        torch.manual_seed(0)
        checkpoint.save(root / "sft", 1, Transformer(c), config={"model": vars(c), "stage": "sft"}, meta={"tokens": 0},
                        tokenizer_path=str(root / "tokenizer.json"))
        checkpoint.save(root / "rm", 1, ScoreModel(c, 1), config={"model": vars(c), "stage": "reward",
                                                                  "reward": {"offset": 0.0, "std": 1.0}},
                        meta={"tokens": 0}, tokenizer_path=str(root / "tokenizer.json"))
        prompts = root / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}, please."}) + "\n"
                                   for i in range(4 * rollout)))
        reset_peak(device)
        pc = load_config(PPOConfig, None, [
            f"policy={root / 'sft'}", f"reward_model={root / 'rm'}", f"prompts={prompts}", f"run.out_dir={root / 'ppo'}",
            f"run.max_steps={iters}", "run.eval_every=0", "eval_prompts=2", f"rollout_batch={rollout}",
            f"minibatch={max(1, rollout // 4)}", f"max_new_tokens={new}", "optim.lr=1e-6",
            f"run.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
            f"frozen_precision={'bf16' if device.type == 'cuda' else 'fp32'}", f"run.device={device.type}"])
        ppo.main(pc)
        secs = [r["seconds"] for r in read_metrics(pc.run.out_dir, "train")]
    return {"iterations": len(secs), "rollout": rollout, "new_tokens": new,
            "sec_per_iter_median": statistics.median(secs[1:] or secs), "first_iter_s": secs[0],
            "peak_memory_mb": peak_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script runs")
    ap.add_argument("--json", default="")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script (default 7 min)")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cpu") if a.smoke else dist.pick_device("auto")
    if device.type != "cuda" and not a.smoke:
        raise SystemExit("no CUDA device: run with --smoke for a CPU check of the script")
    if a.smoke:
        cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=2, max_seq_len=64, tie_embeddings=True)
        batch, steps, warm, precision, compile_runs = 2, 3, 1, "fp32", [False]
    else:
        cfg = ModelConfig(vocab_size=32768, dim=768, n_layers=12, n_heads=12, max_seq_len=1024, tie_embeddings=True)
        batch, steps, warm, precision, compile_runs = a.batch, 30, 5, "bf16", [False, True]
        torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "model": vars(cfg)}
    left = lambda: a.budget - (time.perf_counter() - t_start)  # noqa: E731
    if device.type == "cuda":
        res["bf16_matmul_peak_flops"] = matmul_peak(device, torch.bfloat16, 8192)
        res["bf16_spec_peak_flops"] = spec_peak(device)
    res["pretrain"] = []
    for c in compile_runs:
        r = pretrain_bench(cfg, batch, device, precision, c, steps, warm if not c else warm + 3, min(60.0, left() / 4))
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        r["mfu_vs_spec"] = achieved / res["bf16_spec_peak_flops"] if res.get("bf16_spec_peak_flops") else None
        r["mfu_vs_measured_matmul"] = achieved / res["bf16_matmul_peak_flops"] if res.get("bf16_matmul_peak_flops") else None
        res["pretrain"].append(r)
        print(f"pretrain {'compiled' if c else 'eager':8s}: {r['tokens_per_s']:,.0f} tok/s, step {r['step_s_median'] * 1e3:.0f} ms, "
              f"MFU {r['mfu_vs_spec'] or 0:.1%} of spec peak, {r['mfu_vs_measured_matmul'] or 0:.1%} of measured matmul; "
              f"peak {r['peak_memory_mb']:,.0f} MB", flush=True)
    if left() > 60:
        r = rollout_bench(cfg, 4 if a.smoke else 64, 16 if a.smoke else 128, 16 if a.smoke else 128, device, 3)
        res["rollout"] = r
        print(f"rollout: ours {r['ours_tokens_per_s']:,.0f} tok/s; transformers.generate "
              f"{r.get('transformers_tokens_per_s') or 0:,.0f} tok/s; ratio {r.get('ratio') or 0:.2f}", flush=True)
    if left() > 60:
        r = graphed_rollout_bench(cfg, 4 if a.smoke else 64, 16 if a.smoke else 128, 16 if a.smoke else 128, device,
                                  {"backend": "eager"} if a.smoke else {"mode": "reduce-overhead"})
        res["graphed_rollout"] = r
        print(f"static-cache rollout: eager {r['eager_tokens_per_s']:,.0f} tok/s; CUDA graphs "
              f"{r.get('graphed_tokens_per_s') or 0:,.0f} tok/s (first call {r.get('first_call_s') or 0:.1f} s), "
              f"same tokens {r.get('same_tokens')} {r.get('compile_error', '')}", flush=True)
    if left() > 60:
        r = ppo_bench(cfg, device, 3 if a.smoke else 4, 4 if a.smoke else 32, 8 if a.smoke else 128)
        res["ppo"] = r
        print(f"ppo: {r['sec_per_iter_median']:.2f} s/iteration (rollout {r['rollout']} x {r['new_tokens']} tokens), "
              f"peak {r['peak_memory_mb']:,.0f} MB", flush=True)
    res["total_s"] = time.perf_counter() - t_start
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print(f"done in {res['total_s']:.0f} s" + (f"; figures in {a.json}" if a.json else ""))


if __name__ == "__main__":
    main()
