"""Heads on the backbone that read one vector per sequence: classification, reward, value.

`ScoreModel` is the backbone (HF `LlamaModel`) with a linear `score` layer in place of the
word head, read at each sequence's last real token: HF's `LlamaForSequenceClassification`
(same names), with n_out = number of labels, or 1 for a reward or value model.
"""
from __future__ import annotations

import torch
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.transformer import Backbone


class ScoreModel(nn.Module):
    def __init__(self, cfg: ModelConfig, n_out: int):
        super().__init__()
        self.config = cfg.resolved()
        self.n_out = n_out
        self.model = Backbone(self.config)
        self.score = nn.Linear(self.config.dim, n_out, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (self.config.dim + 1) ** 0.5)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                span: slice | None = None) -> torch.Tensor:
        """input_ids (B, T), right-padded; lengths (B,) real tokens per row -> scores (B, n_out).

        Right padding needs no attention mask: under causal attention a real token never sees
        the padding after it. Without `lengths`: the head at every position, (B, T, n_out), or
        at the positions of `span` only.
        """
        if lengths is None:
            h = self.model(input_ids, attention_mask, position_ids)
            return self.score(h if span is None else h[:, span].contiguous())  # see Transformer.forward
        return self.score(self.last_hidden(input_ids, lengths))

    def last_hidden(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The backbone's output at each row's last real token: (B, D)."""
        h = self.model(input_ids)  # (B, T, D)
        return h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, span: slice | None = None) -> torch.Tensor:
        """The head at every position (B, T, n_out), or at those of `span`. PPO's value head
        reads it per answer token. (Through __call__, so module hooks, e.g. FSDP2's gathering
        of parameters, run.)"""
        return self(input_ids, None, attention_mask, position_ids, span)
