"""The modules an RL run trains or consults beyond the plain transformer and score model:
policy and value model under one module, and the reward model seen through a LoRA value model."""
from __future__ import annotations

import torch

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

    def forward(self, ids, mask, pos, span: slice | None = None):
        """-> the policy's logits and the value model's estimates ((B, T) or None), at every
        position or at those of `span` only (the answers': see `Transformer.forward`)."""
        logits = self.policy(ids, mask, pos, span=span)
        return logits, (self.value.forward_tokens(ids, mask, pos, span)[..., 0] if self.value is not None else None)
