"""Cutting the cost of fine-tuning: freeze parameters by name pattern.

Patterns are shell-style globs over parameter names (`fnmatch`), e.g.
    model.embed_tokens.*        the input embeddings
    model.layers.[0-3].*        the first four blocks (or use `first_layers: 4`)
    *.self_attn.*               every attention projection
A frozen parameter has requires_grad=False, so it gets no gradient and no optimizer state.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from llmtrain.errors import ConfigError


def freeze(model: torch.nn.Module, patterns: list[str] = (), first_layers: int = 0) -> list[str]:
    """Freeze every parameter matching a pattern, and the first `first_layers` blocks.

    Returns the frozen names. A pattern that matches nothing is an error (a typo would
    otherwise silently train everything).
    """
    pats = list(patterns) + [f"model.layers.{i}.*" for i in range(first_layers)]
    names = [n for n, _ in model.named_parameters()]
    for p in pats:
        if not any(fnmatchcase(n, p) for n in names):
            raise ConfigError(f"freeze pattern {p!r} matches no parameter (names look like {names[1]!r})")
    frozen = []
    for n, param in model.named_parameters():
        if any(fnmatchcase(n, p) for p in pats):
            param.requires_grad_(False)
            frozen.append(n)
    return frozen
