"""Stage 1, pretraining: next-token prediction on packed token shards.

    llmtrain pretrain -c configs/pretrain-tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m llmtrain pretrain -c ...      (DDP, gloo on CPU / nccl on GPU)

Reads top to bottom: set up, build the model, (resume), loop over steps, evaluate, save.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from llmtrain import checkpoint, dist, training
from llmtrain.config import PretrainConfig
from llmtrain.data.pretrain import TokenWindows, load_meta
from llmtrain.errors import ConfigError
from llmtrain.losses import lm_loss
from llmtrain.model import Transformer
from llmtrain.training import count_params, optimizer_step


def main(cfg: PretrainConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)

    # ---- data and model
    meta = load_meta(cfg.data.shards)
    mcfg = cfg.model
    if mcfg.vocab_size == 0:
        mcfg.vocab_size = meta["vocab_size"]
    elif mcfg.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}")
    seq_len = mcfg.max_seq_len
    train_data = TokenWindows(cfg.data.shards, "train", seq_len, run.seed)
    val_data = TokenWindows(cfg.data.shards, "val", seq_len, run.seed)

    torch.manual_seed(run.seed)
    model = Transformer(mcfg)
    model.init_weights(seed=run.seed)
    if cfg.init_from:
        checkpoint.load_weights(cfg.init_from, model)
    model.to(env.device)

    s = training.start("pretrain", cfg, model, mcfg, meta["tokenizer"], env, counts_tokens=True)
    log, optimizer = s.log, s.optimizer
    tokens_seen = s.resumed_meta.get("tokens", 0)
    trainable, total = count_params(model)
    tokens_per_step = run.batch_size * run.grad_accum * env.world * seq_len
    training.announce(s, f"pretrain: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
                         f"{env.world} process(es) on {env.device}, {run.precision}; {tokens_per_step:,} tokens per "
                         f"step; train {train_data.tokens:,} tokens, val {val_data.tokens:,}")

    def evaluate(done: int) -> float:
        model.eval()
        losses = []
        with torch.no_grad(), dist.autocast(env.device, run.precision):
            for i in range(run.eval_batches):
                x, y = val_data.batch(i, run.batch_size, rank=env.rank, world=env.world)
                losses.append(lm_loss(model(x.to(env.device)), y.to(env.device)))
        model.train()
        val_loss = float(dist.all_reduce_mean(torch.stack(losses).mean(), env))
        log.log(done, "val", loss=val_loss, ppl=math.exp(min(val_loss, 50)))
        log.print(f"step {done:>6} | val loss {val_loss:.4f} | ppl {math.exp(min(val_loss, 50)):.2f}")
        return val_loss

    def save(step: int, tokens: int, val_loss: float) -> None:
        training.save(s, step, {"tokens": tokens, "data": {"seed": run.seed, "next_step": step}, "val_loss": val_loss})

    # ---- the loop
    progress = training.begin(s, tokens_seen)
    val_loss = float("nan")
    for step, lr in training.steps(s):

        def loss_of(micro, m):
            x, y = train_data.batch(step, run.batch_size, micro, run.grad_accum, env.rank, env.world)
            return lm_loss(m(x.to(env.device)), y.to(env.device)) / run.grad_accum

        step_loss = training.accumulate(s.train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        tokens_seen += tokens_per_step
        val_loss = training.end_step(s, progress, step + 1, step_loss, lr, grad_norm, tokens_seen, evaluate, save, val_loss)

    return training.finish(s, progress)
