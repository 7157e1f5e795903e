"""Cutting the cost of fine-tuning: freeze parameters by name pattern.

Patterns are shell-style globs over parameter names (`fnmatch`), e.g.
    model.embed_tokens.*        the input embeddings
    model.layers.[0-3].*        the first four blocks (or use `first_layers: 4`)
    *.self_attn.*               every attention projection
A frozen parameter has requires_grad=False, so it gets no gradient and no optimizer state.
"""
from __future__ import annotations

from contextlib import contextmanager
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


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(torch.nn.Linear):
    """A Linear whose frozen weight W gets a trainable low-rank update (Hu et al., 2021):

        y = x W^T + (alpha / r) * dropout(x) A^T B^T,   A (r, in) ~ N(0, 1/r), B (out, r) = 0

    so it starts equal to the original layer. It stays an nn.Linear with the same `weight`
    name: merging writes W + (alpha/r) B A back into `weight` and state dicts keep HF names.
    It takes over the base layer's weight tensor (no copy). With `enabled` false (see
    `adapters_off`) it is the original layer again: PPO's reference model in LoRA mode.
    """

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the same tensor: wrapping costs no memory
        self.bias = base.bias
        self.enabled = True
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        self.lora_A = torch.nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) / r)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = torch.nn.functional.linear(x, self.weight, self.bias)
        if not self.enabled:
            return base
        return base + (self.lora_dropout(x) @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scale


@contextmanager
def adapters_off(model: torch.nn.Module):
    """Run `model` as it was before LoRA: every adapter of it off inside the block."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    was = [m.enabled for m in layers]
    try:
        for m in layers:
            m.enabled = False
        yield model
    finally:
        for m, w in zip(layers, was):
            m.enabled = w


def apply_lora(model: torch.nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> int:
    """Freeze the whole model, then put LoRA on every Linear whose name ends with a target
    (e.g. ["q_proj", "v_proj"]). Returns how many layers got an adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and not isinstance(child, LoRALinear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                n += 1
    if n == 0:
        raise ConfigError(f"LoRA targets {targets} match no linear layer")
    return n


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every LoRA update merged into its weight and no lora_* entries:
    exactly the names and shapes of the model without adapters."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sd[f"{name}.weight"] = module.merged_weight().detach()
    return sd
