"""The modules an RL run trains or consults beyond the plain transformer and score model:
policy and value model under one module, and the reward model seen through a LoRA value model;
what an RL checkpoint keeps of them, and how a run resumes from one."""
from __future__ import annotations

from pathlib import Path

import torch

from llmtrain import checkpoint, dist
from llmtrain.errors import CheckpointError
from llmtrain.model.adapters import adapters_off
from llmtrain.model.heads import ScoreModel
from llmtrain.model.transformer import Transformer


class AdaptersOffScore(torch.nn.Module):
    """The reward model inside a LoRA value model: the value model's backbone with its adapters
    off (LoRA leaves the base weights, i.e. the reward model's, untouched) under a frozen copy
    of the reward model's head (the value head trains, this one does not)."""

    def __init__(self, body: ScoreModel, head: torch.nn.Linear):
        super().__init__()
        self.body, self.score, self.config = body, head, body.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As `ScoreModel.forward`: at each row's last token with `lengths`, else at every position."""
        with adapters_off(self.body):
            if lengths is None:
                return self.score(self.body.model(input_ids, attention_mask, position_ids))
            return self.score(self.body.last_hidden(input_ids, lengths))


class ActorCritic(torch.nn.Module):
    """Policy and value model (None for GRPO/RLOO) under one module, so one DDP wrapper and one
    optimizer serve both."""

    def __init__(self, policy: Transformer, value: ScoreModel | None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, ids, mask, pos):
        logits = self.policy(ids, mask, pos)
        return logits, (self.value.forward_tokens(ids, mask, pos)[..., 0] if self.value is not None else None)


def value_state(value: ScoreModel, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the value model: all of it, or with LoRA only its head (its
    adapters are in the LoRA state, its base weights are the reward model's)."""
    if lora:
        return {"score.weight": value.score.weight.detach().cpu().clone()}
    return checkpoint.model_state(value)


def resume(step_dir: Path, ac: ActorCritic, optimizer, kl_ctl, env, lora: bool, sharded: bool = False,
           bases: dict | None = None, algorithm: str = "ppo") -> int:
    """Continue from an RL checkpoint: policy (and value model), optimizer, KL coefficient. With
    LoRA the base weights never changed (they are still those of the SFT and reward checkpoints
    the run started from): only the adapters and the value head are restored, exactly. A
    sharded run's checkpoint holds policy, value and optimizer in dcp/."""
    stage = checkpoint.read_config(step_dir).get("stage")
    if stage != algorithm:
        raise CheckpointError(f"{step_dir}: a {stage} checkpoint, but this run is {algorithm}; "
                              f"resume it with `llmtrain {stage}` or start {algorithm} in another run.out_dir")
    saved = checkpoint.read_meta(step_dir).get("bases")
    if lora and bases and saved and saved != bases:
        raise CheckpointError(f"{step_dir}: its LoRA adapters sit on {saved}, but this run starts from {bases}; "
                              "resume with the same policy and reward_model checkpoints")
    state = checkpoint.load_train_state(step_dir, env.rank)
    if sharded or (checkpoint.resolve(step_dir) / "dcp").is_dir():
        checkpoint.load_model_and_optimizer(step_dir, ac, optimizer, state)
    elif lora:
        ac.load_state_dict(state["extra"]["lora"], strict=False)
        if ac.value is not None:
            ac.value.score.weight.data.copy_(state["extra"]["value"]["score.weight"])
    else:
        checkpoint.load_weights(step_dir, ac.policy)
        if ac.value is not None:
            ac.value.load_state_dict(state["extra"]["value"], strict=False)
    if state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state.get("rng"):
        dist.set_rng_state(state["rng"])
    meta = checkpoint.read_meta(step_dir)
    kl_ctl.value = meta.get("beta", kl_ctl.value)
    return meta["step"]
