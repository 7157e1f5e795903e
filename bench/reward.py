"""Reward-model training step: answers packed end to end (llmtrain/data/packing.py) against the
same answers right-padded to the longest, on the same model and batch.

    python bench/reward.py [--rankings 4 --k 8 --repeats 12 --dim 128 --layers 4 --device cpu]

A batch is `rankings` prompts of K answers each, every answer forwarded once, as the reward
stage does. Lengths are drawn as in the demo's rankings: a prompt of 8-40 tokens and an
answer of 3-40 (a quarter cut off at 40). Prints the median seconds per step (forward,
backward, AdamW) of each layout, real tokens/s, the share of padding, and the ratio; and
checks that both give the same rewards.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.config import ModelConfig
from llmtrain.data.packing import pack
from llmtrain.model.heads import ScoreModel


def batch(g: torch.Generator, rankings: int, k: int, vocab: int) -> list[list[int]]:
    seqs = []
    for _ in range(rankings):
        prompt = torch.randint(3, vocab, (int(torch.randint(8, 41, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k):
            cut = torch.rand(1, generator=g).item() < 0.25
            n = 40 if cut else int(torch.randint(3, 40, (1,), generator=g))
            seqs.append(prompt + torch.randint(3, vocab, (n,), generator=g).tolist())
    return seqs


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    x = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) for s in seqs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rankings", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--capacity", type=int, default=128, help="tokens per packed row (the demo's max_seq_len)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads // 2,
                      max_seq_len=a.capacity)
    model = ScoreModel(cfg, 1).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    batches = [batch(g, a.rankings, a.k, a.vocab) for _ in range(a.repeats + 2)]

    def step_padded(seqs):
        x, lengths = padded(seqs)
        return model(x.to(a.device), lengths.to(a.device))[:, 0]

    def step_packed(seqs):
        b = pack(seqs, a.capacity, 0).to(a.device)
        return model(b.ids, None, b.mask, b.positions)[b.end_rows, b.end_cols, 0]

    with torch.no_grad():
        diff = (step_padded(batches[0]) - step_packed(batches[0])).abs().max().item()
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for i, seqs in enumerate(batches):
        for name, fn in (("padded", step_padded), ("packed", step_packed)):
            t0 = time.perf_counter()
            fn(seqs).sum().backward()
            opt.step()
            opt.zero_grad()
            if a.device != "cpu":
                torch.cuda.synchronize()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    real = statistics.mean(sum(map(len, s)) for s in batches)
    pad_share = statistics.mean(1 - sum(map(len, s)) / (len(s) * max(map(len, s))) for s in batches)
    pack_share = statistics.mean(1 - sum(map(len, s)) / pack(s, a.capacity, 0).ids.numel() for s in batches)
    print(f"model {model.model.embed_tokens.weight.shape[1]}d x {a.layers} layers; {a.rankings} rankings x {a.k} answers "
          f"per step, {real:.0f} real tokens; max |reward difference| {diff:.1e}")
    for name, share in (("padded", pad_share), ("packed", pack_share)):
        med = statistics.median(times[name])
        print(f"{name:7s} {med * 1000:7.1f} ms/step  {real / med:9,.0f} real tok/s  padding {share:.0%}")
    print(f"packed / padded speed: {statistics.median(times['padded']) / statistics.median(times['packed']):.2f}x")


if __name__ == "__main__":
    main()
