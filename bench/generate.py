"""Rollout speed: our batched KV-cache generation against `transformers.generate` on the same
weights (our parameter names are HF Llama's, so the state dict loads as is).

    python bench/generate.py [--batches 1 16 --precisions fp32 bf16 --prompt-len 32 --new 64 --repeats 7]

Greedy decoding, same batch, prompt length, new tokens and weight dtype (bf16: both models cast
to bf16, no autocast), no early stop (no stop token), so both produce exactly batch x new tokens.
The two run alternately, one call each per repeat, so a slow spell of the machine hits both;
prints the median tokens/s of each, the median of the per-repeat ratios, and how many greedy
rows agree. The default model is the issue's "16M Llama": TRL's default sizes (6 layers, width
384, 6 heads, 3 key/value heads, vocab 8192), 16.6M parameters with an untied word head.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.config import ModelConfig
from llmtrain.generate import SamplingConfig, generate
from llmtrain.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    import transformers

    cfg = ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      max_seq_len=a.prompt_len + a.new + 8, init_std=0.1)
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    print(f"model: {base.num_params() / 1e6:.2f}M parameters, prompt {a.prompt_len} + {a.new} new tokens, greedy, "
          f"{a.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'precision':<10}{'batch':>6}{'ours tok/s':>12}{'HF tok/s':>10}{'ratio':>8}{'same rows':>11}")
    for prec in a.precisions:
        dtype = DTYPES[prec]
        ours = Transformer(cfg).to(a.device, dtype).eval()
        ours.load_state_dict(base.state_dict())
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.hf_config())).eval()
        hf.load_state_dict(base.state_dict())
        rotary, inv_freq = hf.model.rotary_emb, hf.model.rotary_emb.inv_freq.clone()
        hf.to(a.device, dtype)
        # `.to(bf16)` also rounds HF's rotary frequencies (a buffer) to bf16, so its angles drift
        # from ours (whose tables stay fp32 on any cast): both get the fp32 frequencies here.
        rotary.inv_freq, rotary.original_inv_freq = inv_freq.to(a.device), inv_freq.clone().to(a.device)
        hf.generation_config.pad_token_id = 0
        for batch in a.batches:
            prompts = torch.randint(1, a.vocab, (batch, a.prompt_len), device=a.device)
            s = SamplingConfig(max_new_tokens=a.new, temperature=0.0)

            def run_ours():
                return generate(ours, prompts.tolist(), s, pad_id=0)

            def run_hf():
                with torch.no_grad():
                    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=a.new,
                                      min_new_tokens=a.new, do_sample=False, eos_token_id=None)
                return out[:, a.prompt_len:].tolist()

            o_ours, o_hf = run_ours(), run_hf()  # warm-up (and the outputs compared)
            t_ours, t_hf = [], []
            for _ in range(a.repeats):
                for fn, ts in ((run_ours, t_ours), (run_hf, t_hf)):
                    t = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t)
            n = batch * a.new
            ratio = statistics.median(h / o for h, o in zip(t_hf, t_ours))
            same = sum(x == y for x, y in zip(o_ours, o_hf))
            print(f"{prec:<10}{batch:>6}{n / statistics.median(t_ours):>12,.0f}{n / statistics.median(t_hf):>10,.0f}"
                  f"{ratio:>7.2f}x{same:>6}/{batch}")


if __name__ == "__main__":
    main()
