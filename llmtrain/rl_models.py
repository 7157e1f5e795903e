"""The models of an RL run (llmtrain/stages/ppo.py): built from the SFT and reward checkpoints,
kept in a checkpoint, resumed from one."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from llmtrain import checkpoint, dist
from llmtrain.config import PPOConfig
from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.model import Transformer
from llmtrain.model.actor_critic import ActorCritic, AdaptersOffScore
from llmtrain.model.adapters import adapters_off, apply_lora, freeze
from llmtrain.model.heads import ScoreModel
from llmtrain.rl import AdaptiveKL, FixedKL
from llmtrain.scoring import load_reward_model
from llmtrain.training import build_optimizer, set_lr


# "auto" takes bf16 from this policy size up. Below it a step is per-op overhead, not arithmetic,
# and bf16 kernels cost more per call: at the demo's 1M parameters an iteration took 0.57 s with
# bf16 rollouts and frozen models against 0.52 s in fp32 (PPO; GRPO 0.47 against 0.38), at 16M
# 0.32x TRL's time against 0.46x for GRPO (bench/rlhf.py).
AUTO_BF16_MIN_PARAMS = 8_000_000


def resolved_precision(setting: str, run_precision: str, device: torch.device, params: int) -> str:
    """An RL precision setting ("auto", "fp32", "bf16") as used: auto is bf16 where the device
    computes bf16 natively (dist.native_bf16) and the policy has at least AUTO_BF16_MIN_PARAMS
    parameters, else the run's precision."""
    if setting == "auto":
        return "bf16" if dist.native_bf16(device) and params >= AUTO_BF16_MIN_PARAMS else run_precision
    return setting


@dataclass
class Models:
    """What a run trains and consults, built once by `build_models`."""
    policy: Transformer
    value: ScoreModel | None  # PPO's value model; None for GRPO/RLOO
    reference: Callable  # (ids, mask, pos) -> logits of the frozen SFT model
    reward_model: torch.nn.Module
    norm: dict  # the reward model's normalisation ("offset")
    ac: ActorCritic  # policy + value: one optimizer, one checkpoint
    train_ac: torch.nn.Module  # `ac` as the update calls it: DDP-wrapped, or itself (FSDP wraps the parts)
    optimizer: torch.optim.Optimizer
    kl_ctl: FixedKL | AdaptiveKL
    sharded: bool
    note: str  # LoRA or not, for the setup line
    frozen_precision: str  # what reference and reward model run in ("fp32" / "bf16"), `auto` resolved
    rollout_dtype: torch.dtype  # what the rollouts' decoding copy of the policy holds


def frozen_reward_model(cfg: PPOConfig, dev, dtype: torch.dtype) -> tuple[ScoreModel, dict]:
    model, _, norm = load_reward_model(cfg.reward_model, dev)
    model.requires_grad_(False)
    return model.to(dtype), norm


def without_adapters(policy: Transformer, ids, mask, pos, span: slice | None = None) -> torch.Tensor:
    """The reference under LoRA: the policy with its adapters off (its base weights are the SFT model's)."""
    with adapters_off(policy):
        return policy(ids, mask, pos, span=span)


def build_models(cfg: PPOConfig, env, mcfg, sft_ckpt: Path) -> Models:
    """The policy (all, some (freeze) or LoRA weights trained), PPO's value model (from the reward
    model, as in InstructGPT), and, without gradients, the reference and the reward model. With
    LoRA the frozen two are not copies: the reference is the policy with its adapters off, and
    the reward model is the value model's backbone with its adapters off under the reward
    model's own head, so two models sit in memory instead of four."""
    run, dev, lora, critic = cfg.run, env.device, cfg.lora, cfg.algorithm == "ppo"
    torch.manual_seed(run.seed)
    policy = Transformer(mcfg)
    n_params = policy.num_params()
    frozen_precision = resolved_precision(cfg.frozen_precision, run.precision, dev, n_params)
    frozen_dtype = torch.bfloat16 if frozen_precision == "bf16" else torch.float32
    rollout_dtype = torch.bfloat16 if resolved_precision(cfg.rollout_precision, run.precision, dev,
                                                         n_params) == "bf16" else torch.float32
    checkpoint.load_weights(sft_ckpt, policy)
    value = None
    if critic:
        value, _, norm = load_reward_model(cfg.reward_model, dev)  # the value model starts as the reward model
    if lora.enabled:
        n = apply_lora(policy, lora.targets, lora.r, lora.alpha, lora.dropout)
        if critic:
            apply_lora(value, lora.targets, lora.r, lora.alpha, lora.dropout)
            rm_head = torch.nn.Linear(value.config.dim, 1, bias=False, device=dev)
            rm_head.load_state_dict(value.score.state_dict())
            rm_head.requires_grad_(False)
            value.score.weight.requires_grad_(True)  # the value head itself is always trained
            reward_model = AdaptersOffScore(value, rm_head)
        else:
            reward_model, norm = frozen_reward_model(cfg, dev, frozen_dtype)
        reference = partial(without_adapters, policy)
        note = f"LoRA r={lora.r} on {n} layers; the reference is the policy with its adapters off"
    else:
        reference = Transformer(mcfg)
        checkpoint.load_weights(sft_ckpt, reference)
        reference.requires_grad_(False)
        reference.to(dev, frozen_dtype).eval()
        reward_model, norm = frozen_reward_model(cfg, dev, frozen_dtype)
        freeze(policy, cfg.freeze.patterns, cfg.freeze.first_layers)
        if critic:
            freeze(value, cfg.freeze.patterns, cfg.freeze.first_layers)
        note = "no LoRA"
    ac = ActorCritic(policy, value).to(dev).eval()  # eval mode throughout: no dropout in RL
    # ddp: one DDP wrapper over policy and value. fsdp: each sharded as its own root, so the
    # policy can also be called alone (rollouts, evaluation); reference and reward model are
    # replicated (frozen, no gradients, no optimizer state).
    sharded = run.strategy == "fsdp" and env.distributed
    if sharded and lora.enabled:
        raise ConfigError(f"{cfg.algorithm} with lora.enabled runs under run.strategy=ddp (adapters are small; "
                          "LoRA shares the frozen models' weights, which FSDP would shard)")
    if sharded:
        for part in (policy, value):
            if part is not None:
                dist.wrap(part, env, "fsdp", run.precision, run.activation_checkpointing)
        train_ac = ac
    else:
        train_ac = dist.wrap(ac, env, "ddp", run.precision, run.activation_checkpointing)
    optimizer = build_optimizer(ac, cfg.optim, dev)
    set_lr(optimizer, cfg.optim.lr)  # constant: PPOConfig refuses a warmup or schedule
    kl_ctl = AdaptiveKL(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKL(cfg.kl.beta)
    return Models(policy, value, reference, reward_model, norm, ac, train_ac, optimizer, kl_ctl, sharded, note,
                  frozen_precision, rollout_dtype)


def value_state(value: ScoreModel, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the value model: all of it, or with LoRA only its head (its
    adapters are in the LoRA state, its base weights are the reward model's)."""
    if lora:
        return {"score.weight": value.score.weight.detach().cpu().clone()}
    return checkpoint.model_state(value)


def extra_state(m: Models, lora: bool) -> dict:
    """What an RL checkpoint keeps beside the policy's weights and the optimizer (train_state.pt's
    "extra"): the LoRA adapters, and PPO's value model (nothing of it when sharded: dcp/ holds it)."""
    extra = {"lora": {k: v.detach().cpu() for k, v in m.ac.state_dict().items() if ".lora_" in k}}
    if m.value is not None:
        extra["value"] = {} if m.sharded else value_state(m.value, lora)
    return extra


def resume(run_dir: Path, m: Models, env, cfg: PPOConfig, bases: dict) -> tuple[Path | None, dict]:
    """With run.resume, continue from the latest RL checkpoint of `run_dir`: policy (and value
    model), optimizer, KL coefficient. With LoRA the base weights never changed (they are still
    those of the SFT and reward checkpoints the run started from): only the adapters and the
    value head are restored, exactly. A sharded run's checkpoint holds policy, value and
    optimizer in dcp/. Returns (folder or None, its meta.json dict or {}), as training.resume."""
    steps = checkpoint.step_dirs(run_dir)
    if not cfg.run.resume or not steps:
        return None, {}
    step_dir, ac, lora, algorithm = steps[-1], m.ac, cfg.lora.enabled, cfg.algorithm
    stage = checkpoint.read_config(step_dir).get("stage")
    if stage != algorithm:
        raise CheckpointError(f"{step_dir}: a {stage} checkpoint, but this run is {algorithm}; "
                              f"resume it with `llmtrain {stage}` or start {algorithm} in another run.out_dir")
    saved = checkpoint.read_meta(step_dir).get("bases")
    if lora and bases and saved and saved != bases:
        raise CheckpointError(f"{step_dir}: its LoRA adapters sit on {saved}, but this run starts from {bases}; "
                              "resume with the same policy and reward_model checkpoints")
    state = checkpoint.load_train_state(step_dir, env.rank)
    if m.sharded or (checkpoint.resolve(step_dir) / "dcp").is_dir():
        checkpoint.load_model_and_optimizer(step_dir, ac, m.optimizer, state)
    elif lora:
        ac.load_state_dict(state["extra"]["lora"], strict=False)
        if ac.value is not None:
            ac.value.score.weight.data.copy_(state["extra"]["value"]["score.weight"])
    else:
        checkpoint.load_weights(step_dir, ac.policy)
        if ac.value is not None:
            ac.value.load_state_dict(state["extra"]["value"], strict=False)
    if state.get("optimizer") is not None:
        m.optimizer.load_state_dict(state["optimizer"])
    if state.get("rng"):
        dist.set_rng_state(state["rng"])
    meta = checkpoint.read_meta(step_dir)
    m.kl_ctl.value = meta.get("beta", m.kl_ctl.value)
    return step_dir, meta
