"""The sections several stages share: the model, the optimizer, the run, freezing, LoRA, KL."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llmtrain.config.rules import (BETA, DEVICE, FRACTION, NON_NEGATIVE, OUTPUT_DIR, POSITIVE, SEED, THREADS, at_least,
                                   check)
from llmtrain.config.unused import Unused
from llmtrain.errors import ConfigError

@dataclass
class ModelConfig:
    """A Llama-style decoder. Field names are short; `hf_config()` maps them to HF names."""

    vocab_size: int = check(0, NON_NEGATIVE | "0: from the tokenizer")  # 0: taken from the tokenizer / data at build time
    dim: int = check(256, POSITIVE)
    n_layers: int = check(4, POSITIVE)
    n_heads: int = check(4, POSITIVE)
    n_kv_heads: int = check(0, NON_NEGATIVE | "0: model.n_heads")  # 0: same as n_heads (plain multi-head attention)
    ffn_dim: int = check(0, NON_NEGATIVE | "0: about 8/3 x dim")  # 0: about 8/3 * dim rounded up to a multiple of 64 (SwiGLU)
    max_seq_len: int = check(256, at_least(2))
    rope_theta: float = check(10000.0, POSITIVE)
    norm_eps: float = check(1e-5, POSITIVE)
    tie_embeddings: bool = False
    init_std: float = check(0.02, POSITIVE)
    # Features of imported Hugging Face models (llmtrain/interop); the defaults change nothing.
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj never has one
    rope_scaling: Literal["none", "llama3"] = "none"  # "llama3": Llama 3.1's frequency-dependent scaling
    rope_factor: float = check(8.0, POSITIVE)  # llama3: how much the low frequencies are stretched
    rope_low_freq_factor: float = check(1.0, POSITIVE)  # llama3: wavelengths above original / low are divided by factor
    rope_high_freq_factor: float = check(4.0, POSITIVE)  # llama3: wavelengths below original / high are kept
    rope_original_max_len: int = check(8192, POSITIVE)  # llama3: the context the model was first trained on

    def _checks(self, p: str) -> list[tuple[str, str]]:
        """Relations between fields, checked at load (`p` is this section's dotted prefix)."""
        out = []
        if self.dim % self.n_heads:
            out.append(("n_heads", f"must divide {p}dim={self.dim}"))
        elif (self.dim // self.n_heads) % 2:
            out.append(("n_heads", f"must leave an even head size ({p}dim / {p}n_heads) for rotary embeddings"))
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            out.append(("n_kv_heads", f"must divide {p}n_heads={self.n_heads}"))
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            out.append(("rope_high_freq_factor", f"must be above {p}rope_low_freq_factor"))
        return out

    def resolved(self) -> "ModelConfig":
        """A copy with the derived fields (kv heads, ffn width) filled in and checked."""
        c = dataclasses.replace(self)
        if c.n_kv_heads == 0:
            c.n_kv_heads = c.n_heads
        if c.ffn_dim == 0:
            c.ffn_dim = 64 * ((int(8 * c.dim / 3) + 63) // 64)
        if c.dim % c.n_heads:
            raise ConfigError(f"model.dim={c.dim} is not divisible by model.n_heads={c.n_heads}")
        if c.n_heads % c.n_kv_heads:
            raise ConfigError(f"model.n_heads={c.n_heads} is not divisible by model.n_kv_heads={c.n_kv_heads}")
        if (c.dim // c.n_heads) % 2:
            raise ConfigError("model.dim / model.n_heads (the head size) must be even for rotary embeddings")
        if c.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set (and no tokenizer gave one)")
        if c.rope_scaling == "llama3":
            if c.rope_factor <= 0 or c.rope_original_max_len <= 0:
                raise ConfigError("model.rope_factor and model.rope_original_max_len must be positive for llama3 scaling")
            if c.rope_high_freq_factor <= c.rope_low_freq_factor:
                raise ConfigError("model.rope_high_freq_factor must be above model.rope_low_freq_factor")
        return c

    def hf_architecture(self) -> str:
        """The Hugging Face class that computes exactly this model. Biases on q/k/v only are
        Qwen2's layout: Llama's `attention_bias` would put one on o_proj as well."""
        return "Qwen2ForCausalLM" if self.attention_bias else "LlamaForCausalLM"

    def hf_config(self) -> dict:
        """The keyword arguments of the Hugging Face config of `hf_architecture()`: `LlamaConfig`,
        or `Qwen2Config` with q/k/v biases. Rope settings use the names config.json files carry
        (`rope_theta`, `rope_scaling`), which transformers 4.x and 5.x both read."""
        c = self.resolved()
        kw = dict(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
            rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
            hidden_act="silu", attention_bias=False, mlp_bias=False,
        )
        if c.rope_scaling == "llama3":
            kw["rope_scaling"] = dict(rope_type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                                      high_freq_factor=c.rope_high_freq_factor,
                                      original_max_position_embeddings=c.rope_original_max_len)
        if c.attention_bias:  # Qwen2 always has q/k/v biases and no such switches
            del kw["attention_bias"], kw["mlp_bias"]
            kw.update(use_sliding_window=False, sliding_window=None)
        return kw


@dataclass
class OptimConfig:
    lr: float = check(1e-3, POSITIVE)
    min_lr_ratio: float = check(0.1, FRACTION)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = check(100, NON_NEGATIVE)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = check(0.1, NON_NEGATIVE)  # matrices only; norms and biases get none
    beta1: float = check(0.9, BETA)
    beta2: float = check(0.95, BETA)
    eps: float = check(1e-8, POSITIVE)
    grad_clip: float = check(1.0, NON_NEGATIVE | "0: no clipping")  # 0 disables clipping
    impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"

    UNUSED: ClassVar[tuple[Unused, ...]] = (
        Unused("min_lr_ratio", "it is where the cosine decay ends", "with {p}schedule=constant",
               lambda c: c.schedule == "constant"),
    )


@dataclass
class RunConfig:
    """What every training stage shares: where, how long, how big, how precise."""

    out_dir: str = check("runs/pretrain", OUTPUT_DIR)
    max_steps: int = check(1000, NON_NEGATIVE | "0: check everything, train nothing, save nothing")
    batch_size: int = check(8, POSITIVE)  # per process, per micro-step
    grad_accum: int = check(1, at_least(1))  # micro-steps per optimizer step
    log_every: int = check(10, POSITIVE)
    eval_every: int = check(200, NON_NEGATIVE | "0: only at the end")  # 0: only at the end
    eval_batches: int = check(20, NON_NEGATIVE | "0: the whole held-out set")  # batches per evaluation; 0: the whole held-out set
    save_every: int = check(0, NON_NEGATIVE | "0: only at the end")  # 0: only at the end
    keep_last: int = check(2, NON_NEGATIVE | "0: keep every one")  # step checkpoints kept on disk
    resume: bool = False
    seed: int = check(1337, SEED)
    device: str = check("auto", DEVICE)  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    tensorboard: bool = False
    threads: int = check(0, THREADS)  # CPU intra-op threads; 0 leaves torch's default


@dataclass
class FreezeConfig:
    patterns: list[str] = field(default_factory=list)  # globs over parameter names
    first_layers: int = check(0, NON_NEGATIVE)  # freeze blocks 0 .. N-1


@dataclass
class KLConfig:
    beta: float = check(0.05, NON_NEGATIVE | "0: no KL penalty")  # initial (or fixed) KL coefficient
    # Per-token KL estimate (llmtrain.rl.kl_estimate; both are logged) and where it acts: a
    # penalty in the reward, or beta x mean k3 as a loss term. auto: GRPO k3 in the loss (as
    # DeepSeekMath), PPO and RLOO k1 in the reward (as InstructGPT and RLOO).
    estimator: Literal["auto", "k1", "k3"] = "auto"
    placement: Literal["auto", "reward", "loss"] = "auto"
    adaptive: bool = False
    target: float = check(6.0, POSITIVE)  # the KL (nats per response) to stay under; adaptive: the one to hold
    horizon: int = check(10000, POSITIVE)  # adaptive: how fast beta moves (in rollouts)


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = check(8, POSITIVE)
    alpha: float = check(16.0, POSITIVE)
    dropout: float = check(0.0, BETA)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    UNUSED: ClassVar[tuple[Unused, ...]] = tuple(
        Unused(key, "it shapes the LoRA adapters, which are off", "without {p}enabled", lambda c: not c.enabled)
        for key in ("r", "alpha", "dropout", "targets"))
