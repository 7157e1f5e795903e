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
from llmtrain.config import PretrainConfig, to_dict
from llmtrain.data.pretrain import TokenWindows, load_meta
from llmtrain.errors import ConfigError
from llmtrain.losses import lm_loss
from llmtrain.metrics import Metrics, Progress, fmt_duration
from llmtrain.model import Transformer
from llmtrain.training import count_params, lr_at, optimizer_step, set_lr


def main(cfg: PretrainConfig) -> Path:
    run = cfg.run
    env = dist.setup(run.device, run.threads)
    run_dir = Path(run.out_dir)

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

    train_model, optimizer, resumed, done = training.prepare(model, cfg.optim, run, env, run_dir)
    start_step, tokens_seen = done.get("step", 0), done.get("tokens", 0)

    log = Metrics(run_dir, enabled=env.is_main, tensorboard=run.tensorboard,
                  resume_step=start_step if resumed else None)
    trainable, total = count_params(model)
    tokens_per_step = run.batch_size * run.grad_accum * env.world * seq_len
    log.print(f"pretrain: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
              f"{env.world} process(es) on {env.device}, {run.precision}; "
              f"{tokens_per_step:,} tokens per step; train {train_data.tokens:,} tokens, val {val_data.tokens:,}")
    if resumed:
        log.print(f"resumed from {resumed} at step {start_step}")

    full_config = to_dict(cfg)

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad(), dist.autocast(env.device, run.precision):
            for i in range(run.eval_batches):
                x, y = val_data.batch(i, run.batch_size, rank=env.rank, world=env.world)
                losses.append(lm_loss(model(x.to(env.device)), y.to(env.device)))
        model.train()
        return float(dist.all_reduce_mean(torch.stack(losses).mean(), env))

    def save(step: int, extra: dict) -> None:
        checkpoint.save(run_dir, step, model, config={"model": to_dict(mcfg), "stage": "pretrain", "config": full_config},
                        meta={"tokens": tokens_seen, "data": {"seed": run.seed, "next_step": step}, **extra},
                        tokenizer_path=meta["tokenizer"], optimizer=optimizer, rng=dist.rng_state(),
                        keep_last=run.keep_last, rank=env.rank, barrier=lambda: dist.barrier(env))

    # ---- the loop
    model.train()
    progress = Progress(start_step, run.max_steps, tokens_seen)
    val_loss = float("nan")
    for step in range(start_step, run.max_steps):
        lr = lr_at(step, cfg.optim, run.max_steps)
        set_lr(optimizer, lr)

        def loss_of(micro, m):
            x, y = train_data.batch(step, run.batch_size, micro, run.grad_accum, env.rank, env.world)
            return lm_loss(m(x.to(env.device)), y.to(env.device)) / run.grad_accum

        step_loss = training.accumulate(train_model, run.grad_accum, loss_of, env, run.precision)
        grad_norm = optimizer_step(model, optimizer, cfg.optim.grad_clip)
        tokens_seen += tokens_per_step
        done = step + 1

        if done % run.log_every == 0 or done == run.max_steps or done == start_step + 1:
            loss_v = float(dist.all_reduce_mean(step_loss, env))
            line, tps = progress.line(done, tokens_seen, loss=loss_v, lr=lr, gnorm=grad_norm)
            log.log(done, "train", loss=loss_v, lr=lr, grad_norm=grad_norm, tokens=tokens_seen, tokens_per_s=tps)
            log.print(line)
        if (run.eval_every and done % run.eval_every == 0) or done == run.max_steps:
            val_loss = evaluate()
            log.log(done, "val", loss=val_loss, ppl=math.exp(min(val_loss, 50)))
            log.print(f"step {done:>6} | val loss {val_loss:.4f} | ppl {math.exp(min(val_loss, 50)):.2f}")
        if (run.save_every and done % run.save_every == 0) or done == run.max_steps:
            save(done, {"val_loss": val_loss})

    if start_step >= run.max_steps:
        log.print(f"nothing to do: the checkpoint is at step {start_step} >= run.max_steps={run.max_steps}")
    log.print(f"pretrain done in {fmt_duration(progress.elapsed())}; "
              f"peak memory {dist.peak_memory_mb(env.device):,.0f} MB; {'checkpoint in ' + str(run_dir / 'checkpoints') if checkpoint.step_dirs(run_dir) else 'no checkpoint written (run.max_steps=0)'}")
    log.close()
    dist.teardown()
    return run_dir
