"""Pieces every training stage shares: the checkpoint it starts from, optimizer, learning-rate
schedule, one optimizer step, the end of each step (log, evaluate, save) and of the run.

Deliberately functions, not a trainer class: a stage's main() reads top to bottom and calls
these where it needs them. What they share about one run (model, optimizer, log, where it
resumed) travels in a `Session`, a plain record.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmtrain import checkpoint, dist
from llmtrain.config import ModelConfig, OptimConfig, to_dict
from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.interop.hub import resolve_model
from llmtrain.metrics import Metrics, Progress, fmt_duration
from llmtrain.model import decoder
from llmtrain.tokenizer import Tokenizer


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-d parameters).

    `impl=auto` takes the fused kernel (CUDA and CPU), else foreach.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    impl = cfg.impl
    if impl == "auto":
        # Fused AdamW exists for CPU too since torch 2.4: 61 -> 27 ms per step on the bench model.
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
        impl = "fused" if fused_ok else "foreach"
    if impl == "fused":
        kw["fused"] = True
    elif impl == "foreach":
        kw["foreach"] = True
    else:
        kw["foreach"] = False
    return torch.optim.AdamW(groups, **kw)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over `warmup_steps` to `lr`, then cosine decay to `lr * min_lr_ratio`.

    lr(s) = lr * (s + 1) / W                                   for s < W
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * p)) / 2),  p = (s - W) / (S - W)   otherwise
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or max_steps <= cfg.warmup_steps:
        return cfg.lr
    p = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    m = cfg.min_lr_ratio
    return cfg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip (if asked), step, zero the grads; returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    # clip_grad_norm_ also measures the norm of sharded (FSDP2) gradients; inf clips nothing.
    norm = dist.to_local_float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))) \
        if params else 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    decoder.weights_changed()  # a fused AdamW step leaves the version counters unchanged
    return norm


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def prepare(model: torch.nn.Module, cfg: OptimConfig, run, env, run_dir):
    """Wrap the model for this run's strategy, build its optimizer, and resume when asked.

    Returns (train_model, optimizer, resumed folder or None, its meta.json dict or {}). The
    order matters for FSDP2: shard first, then the optimizer sees the sharded parameters, then
    a checkpoint loads into both.
    """
    train_model = dist.wrap(model, env, run.strategy, run.precision, run.activation_checkpointing)
    optimizer = build_optimizer(model, cfg, env.device)
    resumed, done = resume(run_dir, model, optimizer, env, run.resume)
    if run.compile:
        check_compiler(env.device)
        train_model = torch.compile(train_model)
    return train_model, optimizer, resumed, done


def check_compiler(device: torch.device) -> None:
    """torch.compile on a CPU builds its kernels with the system's C++ compiler (inductor looks
    for $CXX, then g++): where there is none, say so in one line before the first step instead
    of inductor's traceback from inside it."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # private; torch >= 2.5
    except ImportError:
        return  # an older torch: inductor reports it itself
    try:
        get_cpp_compiler()
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"run.compile=true on a CPU needs a C++ compiler for torch.compile (inductor), and none "
                          f"was found ({why}): install g++ (or set CXX), or set run.compile=false") from None


def resume(run_dir, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env, enabled: bool):
    """With `enabled`, load the latest step checkpoint of `run_dir` (weights, optimizer, RNG).

    Returns (folder or None, its meta.json dict or {}); training continues at meta['step'].
    """
    steps = checkpoint.step_dirs(run_dir)
    if not enabled or not steps:
        return None, {}
    last = steps[-1]
    meta = checkpoint.read_meta(last)  # checked first: a damaged checkpoint is an error, never a fresh start
    state = checkpoint.load_train_state(last, env.rank)
    checkpoint.load_model_and_optimizer(last, model, optimizer, state)
    if state.get("rng"):
        try:
            dist.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{last / 'train_state.pt'}: damaged RNG state ({str(e).strip()[:80] or type(e).__name__})") from None
    return last, meta


def accumulate(train_model: torch.nn.Module, n_micro: int, loss_of, env, precision: str) -> torch.Tensor:
    """Forward and backward `n_micro` micro-steps; gradients are all-reduced on the last only.

    `loss_of(micro, model)` returns that micro-step's loss, already scaled so that the sum
    over micro-steps is the step's loss (e.g. mean loss / n_micro). Returns that sum, detached.
    """
    total = torch.zeros((), device=env.device)
    for m in range(n_micro):
        with dist.no_sync(train_model, sync=m == n_micro - 1):
            with dist.autocast(env.device, precision):
                loss = loss_of(m, train_model)
            loss.backward()
        total += loss.detach()
    return total


# ----------------------------------------------------------------------------- a stage's skeleton

def load_base(path: str, key: str, what: str, run_dir: str | Path) -> tuple[Path, Path, Tokenizer, ModelConfig]:
    """The checkpoint a stage starts from -> (its folder, tokenizer file, tokenizer, model config).
    `path` may also be a Hugging Face model folder or a Hub id (org/name[@revision]): it is
    imported into `run_dir/imported/` the first time (interop/hub.py). An empty `path` is a
    ConfigError naming `key` and `what` it should be."""
    if not path:
        raise ConfigError(f"{key} is not set: give {what}")
    base = checkpoint.resolve(resolve_model(path, run_dir, key))
    tok_path = checkpoint.tokenizer_of(base)
    return base, tok_path, Tokenizer.load(tok_path), checkpoint.model_config(base)


@dataclass
class Session:
    """What the shared steps of one stage's run need: a plain record, no behaviour of its own."""
    name: str  # the stage: console lines and checkpoints say it
    cfg: Any  # the stage's config (its .run and .optim)
    env: dist.DistEnv
    model: torch.nn.Module
    model_config: ModelConfig
    tokenizer_path: str | Path
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    log: Metrics
    resumed: Path | None
    start_step: int
    resumed_meta: dict  # the resumed checkpoint's meta.json, {} on a fresh start
    # Token-counting stages (pretrain, sft) log tokens and tokens/s, and their first step too.
    counts_tokens: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)


def start(name: str, cfg, model: torch.nn.Module, model_config: ModelConfig, tokenizer_path: str | Path, env,
          counts_tokens: bool = False, prepared: tuple | None = None) -> Session:
    """Wrap the model, build its optimizer, resume when asked (`prepare`), open metrics.jsonl.
    A stage that wraps, builds and resumes its own (PPO: policy and value model under one
    optimizer) hands in `prepared`, as `prepare` returns it."""
    run = cfg.run
    train_model, optimizer, resumed, done = prepared or prepare(model, cfg.optim, run, env, Path(run.out_dir))
    start_step = done.get("step", 0)
    log = Metrics(run.out_dir, enabled=env.is_main, tensorboard=run.tensorboard,
                  resume_step=start_step if resumed else None)
    return Session(name, cfg, env, model, model_config, tokenizer_path, train_model, optimizer, log, resumed,
                   start_step, done, counts_tokens)


def announce(s: Session, *lines: str) -> None:
    """The stage's opening lines, then where it resumed (every stage says so)."""
    for line in lines:
        s.log.print(line)
    if s.resumed:
        s.log.print(f"resumed from {s.resumed} at step {s.start_step}")


def begin(s: Session, seen: int = 0, unit: str = "tok") -> Progress:
    """Into training mode; the progress line counts from `seen` tokens (or pairs, texts)."""
    s.model.train()
    return Progress(s.start_step, s.cfg.run.max_steps, seen, unit=unit)


def steps(s: Session):
    """The steps still to run (a resumed run goes on where it stopped), each as (step, its
    learning rate), the rate already set on the optimizer."""
    for step in range(s.start_step, s.cfg.run.max_steps):
        lr = lr_at(step, s.cfg.optim, s.cfg.run.max_steps)
        set_lr(s.optimizer, lr)
        yield step, lr


def end_step(s: Session, progress: Progress, done: int, step_loss: torch.Tensor, lr: float, grad_norm: float,
             seen: int, evaluate: Callable[[int], Any], save: Callable[[int, int, Any], None], result: Any) -> Any:
    """The tail of every step: log (every run.log_every), evaluate (every run.eval_every), save
    (every run.save_every), each at the last step too. `done` steps are done, `seen` tokens (or
    pairs, texts) seen. `evaluate(done)` logs and prints its own figures and returns them; they
    are the new `result`, which `save(done, seen, result)` receives. Returns the result."""
    run = s.cfg.run
    last = done == run.max_steps
    if done % run.log_every == 0 or last or (s.counts_tokens and done == s.start_step + 1):
        loss = float(dist.all_reduce_mean(step_loss, s.env))  # a collective: every process logs at the same steps
        line, tps = progress.line(done, seen, loss=loss, lr=lr, gnorm=grad_norm)
        rates = {"tokens": seen, "tokens_per_s": tps} if s.counts_tokens else {}
        s.log.log(done, "train", loss=loss, lr=lr, grad_norm=grad_norm, **rates)
        s.log.print(line)
    if (run.eval_every and done % run.eval_every == 0) or last:
        result = evaluate(done)
    if (run.save_every and done % run.save_every == 0) or last:
        save(done, seen, result)
    return result


def save(s: Session, step: int, meta: dict, extra_state: dict | None = None, train_module: torch.nn.Module | None = None,
         **config) -> None:
    """A step checkpoint: weights, optimizer, RNG; its config.json holds the model's config, the
    stage, `config` (e.g. labels) and the stage's whole config; meta.json holds `meta`.
    `extra_state` goes into train_state.pt; `train_module` is what the optimizer trains when it
    is more than the model (PPO's policy + value: see checkpoint.save)."""
    run, env = s.cfg.run, s.env
    checkpoint.save(s.run_dir, step, s.model,
                    config={"model": to_dict(s.model_config), "stage": s.name, **config, "config": to_dict(s.cfg)},
                    meta=meta, tokenizer_path=str(s.tokenizer_path), optimizer=s.optimizer, rng=dist.rng_state(),
                    keep_last=run.keep_last, rank=env.rank, barrier=lambda: dist.barrier(env),
                    extra_state=extra_state, train_module=train_module)


def finish(s: Session, progress: Progress) -> Path:
    """The closing line (time, peak memory, where the checkpoints are), then close the log and
    the process group. Returns the run folder."""
    run = s.cfg.run
    if s.start_step >= run.max_steps:
        s.log.print(f"nothing to do: the checkpoint is at step {s.start_step} >= run.max_steps={run.max_steps}")
    where = (f"checkpoint in {s.run_dir / 'checkpoints'}" if checkpoint.step_dirs(s.run_dir)
             else "no checkpoint written (run.max_steps=0)")
    s.log.print(f"{s.name} done in {fmt_duration(progress.elapsed())}; "
                f"peak memory {dist.peak_memory_mb(s.env.device):,.0f} MB; {where}")
    s.log.close()
    dist.teardown()
    return s.run_dir
