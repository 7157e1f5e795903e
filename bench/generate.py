"""Rollout speed: our batched KV-cache generation against `transformers.generate` on the same
weights (our parameter names are HF Llama's, so the state dict loads as is).

    python bench/generate.py [--batch 16 --prompt-len 32 --new 64 --repeats 5 --device cpu]

Greedy decoding, same batch, prompt length and new tokens, no early stop (no stop token), so
both produce exactly batch x new tokens. Prints the median tokens/s of each and the ratio, and
checks the two greedy outputs agree.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.config import ModelConfig
from llmtrain.generate import SamplingConfig, generate
from llmtrain.model import Transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    import transformers

    cfg = ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads // 2,
                      max_seq_len=a.prompt_len + a.new + 8, init_std=0.1)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(a.device).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.hf_config())).to(a.device).eval()
    hf.load_state_dict(ours.state_dict())
    hf.generation_config.pad_token_id = 0
    prompts = torch.randint(1, a.vocab, (a.batch, a.prompt_len), device=a.device)
    s = SamplingConfig(max_new_tokens=a.new, temperature=0.0)

    def run_ours():
        return generate(ours, prompts.tolist(), s, pad_id=0)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=a.new,
                              min_new_tokens=a.new, do_sample=False, eos_token_id=None)
        return out[:, a.prompt_len:].tolist()

    def timed(fn):
        fn()  # warm-up
        ts, out = [], None
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), out

    t_ours, o_ours = timed(run_ours)
    t_hf, o_hf = timed(run_hf)
    n = a.batch * a.new
    same = sum(x == y for x, y in zip(o_ours, o_hf))
    print(f"model: {ours.num_params() / 1e6:.2f}M parameters, batch {a.batch}, prompt {a.prompt_len}, "
          f"{a.new} new tokens, greedy, {a.device}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"llmtrain.generate     {n / t_ours:10,.0f} tokens/s   (median of {a.repeats}: {t_ours * 1000:.0f} ms)")
    print(f"transformers.generate {n / t_hf:10,.0f} tokens/s   (median of {a.repeats}: {t_hf * 1000:.0f} ms)")
    print(f"ratio ours/transformers: {t_hf / t_ours:.2f}x; identical greedy rows: {same}/{a.batch}")


if __name__ == "__main__":
    main()
