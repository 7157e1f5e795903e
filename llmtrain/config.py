"""Typed configuration: one dataclass per stage, nesting Model/Optim/Data/Run configs.

A YAML file fills a stage config and ``key=value`` overrides (dotted for nested fields,
e.g. ``optim.lr=3e-4``) are applied on top. Every key is checked against the dataclass
fields and every value against the field's type, so a typo is a one-line error naming the
key instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtrain.errors import ConfigError


# ----------------------------------------------------------------------------- value rules
#
# A field's allowed values are declared next to it: `check(default, RULE)` puts a rule in the
# field's metadata and `from_dict` applies it when a config is loaded, so a bad value is a
# one-line error naming the key and where it came from (the YAML file or the command line)
# before anything runs. Rules that relate two fields are each class's `_checks`.


class Rule:
    """A named condition on one value: `problem(value)` is None when the value is allowed,
    else what it must be (e.g. "must be > 0")."""

    def __init__(self, ok, text: str):
        self.ok, self.text = ok, text

    def problem(self, value) -> str | None:
        return None if self.ok(value) else f"must be {self.text}"

    def __or__(self, note: str) -> "Rule":  # RULE | "0: only at the end" adds what 0 means
        return Rule(self.ok, f"{self.text} ({note})")


POSITIVE = Rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
BETA = Rule(lambda v: 0 <= v < 1, ">= 0 and < 1")
TOP_P = Rule(lambda v: 0 < v <= 1, "> 0 and <= 1")
FRACTION = Rule(lambda v: 0 <= v <= 1, "between 0 and 1")
TEMPERATURE = Rule(lambda v: v >= 0, ">= 0 (0: greedy)")
HELD_OUT_EVERY = Rule(lambda v: v >= 2, ">= 2 (every Nth item is held out)")
SEED = Rule(lambda v: 0 <= v < 2**63, ">= 0 and < 2**63")  # torch and numpy take a signed 64-bit seed
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))  # far more threads than cores only slows; 100000 crashes torch
THREADS = Rule(lambda v: 0 <= v <= MAX_THREADS, f">= 0 and <= {MAX_THREADS} (0: torch's default)")


def at_least(n: int) -> Rule:
    return Rule(lambda v: v >= n, f">= {n}")


class _Device(Rule):
    def __init__(self):
        super().__init__(None, "a device of this machine")

    def problem(self, value) -> str | None:
        # lazy: dist imports torch (about 2 s) to ask which devices exist; configs are also read
        # by commands that never run a model (tests/unit/test_layers.py LAZY_LLMTRAIN)
        from llmtrain.dist import device_problem

        return device_problem(value)


class _Writable(Rule):
    """A path that can be written: an existing directory (or file) there, or a missing one whose
    nearest existing parent is a directory this process can create files in. Probing creates
    and removes one temporary file, so a failed check leaves nothing behind."""

    def __init__(self, kind: str, required: bool = False):
        super().__init__(None, f"a writable {kind} path")
        self.kind, self.required = kind, required

    def problem(self, value) -> str | None:
        if not value.strip():  # "" (where allowed) means "none" or "a default"; blanks never name a path
            return f"must name a {self.kind}, not be empty" if self.required or value else None
        return path_problem(value, self.kind)


DEVICE = _Device()
WRITABLE_DIR = _Writable("directory")
WRITABLE_FILE = _Writable("file")
OUTPUT_DIR = _Writable("directory", required=True)  # an output folder that must be given (never the cwd by accident)
OUTPUT_FILE = _Writable("file", required=True)


def path_problem(path: str | Path, kind: str = "directory") -> str | None:
    """Why `path` cannot be written as a `kind` ("directory" or "file"), or None."""
    p = Path(path)
    if p.exists():
        if kind == "directory" and not p.is_dir():
            return "names a file that exists, not a directory"
        if kind == "file" and p.is_dir():
            return "names a directory, not a file"
    parent = p if kind == "directory" and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmtrain-probe-", dir=parent)
    except OSError as e:
        return f"is not writable (cannot create files in {parent}: {e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def check(default, rule: Rule):
    """A dataclass field with `default` whose values must pass `rule` (checked at load)."""
    return field(default=default, metadata={"check": rule})


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


@dataclass
class RunConfig:
    """What every training stage shares: where, how long, how big, how precise."""

    out_dir: str = check("runs/pretrain", OUTPUT_DIR)
    max_steps: int = check(1000, NON_NEGATIVE | "0: check everything, train nothing, save nothing")
    batch_size: int = check(8, POSITIVE)  # per process, per micro-step
    grad_accum: int = check(1, at_least(1))  # micro-steps per optimizer step
    log_every: int = check(10, POSITIVE)
    eval_every: int = check(200, NON_NEGATIVE | "0: only at the end")  # 0: only at the end
    eval_batches: int = check(20, NON_NEGATIVE)  # batches per evaluation (SFT: 0 = the whole held-out set)
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
class PretrainDataConfig:
    shards: str = "runs/data"  # directory written by `llmtrain prepare`


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init_from: str = ""  # a checkpoint to start from instead of random weights

    def _checks(self, p: str) -> list[tuple[str, str]]:
        return [("run.eval_batches", "must be > 0 (pretraining evaluates that many batches)")] \
            if self.run.eval_batches <= 0 else []


@dataclass
class FreezeConfig:
    patterns: list[str] = field(default_factory=list)  # globs over parameter names
    first_layers: int = check(0, NON_NEGATIVE)  # freeze blocks 0 .. N-1


@dataclass
class SFTDataConfig:
    train: str = "data/sft/aristocrat.jsonl"
    val: str = ""  # empty: hold out every val_every-th example of `train`
    val_every: int = check(10, HELD_OUT_EVERY)
    max_len: int = check(0, NON_NEGATIVE | "0: the context window")  # 0: the model's context window
    skip_bad_lines: bool = False


def _sft_run() -> RunConfig:
    return RunConfig(out_dir="runs/sft", max_steps=300, batch_size=8, eval_every=50, eval_batches=0)


@dataclass
class SFTConfig:
    init_from: str = ""  # the pretrained checkpoint (a run directory or a step folder)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.0))
    run: RunConfig = field(default_factory=_sft_run)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    sample_prompts: int = check(4, NON_NEGATIVE)  # held-out prompts whose answers are logged at each evaluation
    sample_tokens: int = check(48, POSITIVE)


@dataclass
class ClassifyDataConfig:
    train: str = "data/classify/topics.jsonl"
    val: str = ""  # empty: hold out every val_every-th example of `train`
    val_every: int = check(5, HELD_OUT_EVERY)
    max_len: int = check(0, NON_NEGATIVE | "0: the context window")  # 0: the model's context window
    skip_bad_lines: bool = False


@dataclass
class ClassifyConfig:
    init_from: str = ""  # a pretrained or fine-tuned checkpoint
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=10, weight_decay=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/classify", max_steps=200, batch_size=16,
                                                             eval_every=50, eval_batches=0))
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass
class RewardDataConfig:
    train: str = "rankings.jsonl"  # the feedback export (or the chitchat conversion)
    val: str = ""  # empty: hold out the prompts whose hash is 0 mod val_every
    val_every: int = check(5, HELD_OUT_EVERY)
    max_len: int = check(0, NON_NEGATIVE | "0: the context window")  # 0: the model's context window; longer texts keep their end
    min_score_gap: float = check(0.0, NON_NEGATIVE)  # with rated candidates: drop pairs whose ratings differ less
    include_simulated: bool = True
    skip_bad_lines: bool = False


@dataclass
class RewardConfig:
    init_from: str = ""  # the fine-tuned (SFT) checkpoint: backbone of the reward model
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/reward", max_steps=200, batch_size=4,
                                                             eval_every=50, eval_batches=0))
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    margin_scale: float = check(0.0, NON_NEGATIVE)  # margin = scale x rating gap, for rated candidates
    norm_prompts: int = check(32, NON_NEGATIVE)  # held-out prompts whose SFT answers set the reward's zero
    norm_samples: int = check(2, POSITIVE)  # SFT answers sampled per prompt for that
    norm_max_new_tokens: int = check(48, POSITIVE)


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


@dataclass
class PPOConfig:
    """The RL stage: PPO (policy + value model, GAE) or critic-free GRPO / RLOO (G answers per
    prompt, each judged against the others to the same prompt; no value model)."""
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    policy: str = ""  # the SFT checkpoint: initial policy and frozen reference
    reward_model: str = ""  # the reward-model checkpoint: scores, and the value head's start
    prompts: str = "data/sft/aristocrat.jsonl"  # JSONL prompts ({"prompt"} / {"messages"}; responses ignored)
    val_every: int = check(10, HELD_OUT_EVERY)  # every Nth prompt is held out for evaluation (the SFT split, so they are unseen)
    eval_prompts: int = check(32, NON_NEGATIVE | "0: all")  # held-out prompts per evaluation (0: all)
    true_rule: str = ""  # a simulated annotator's rule, the "true" preference to watch for reward hacking
    rollout_batch: int = check(16, POSITIVE)  # prompts per iteration per process
    group_size: int = check(4, POSITIVE)  # grpo / rloo: answers sampled per prompt (rollout_batch x group_size answers)
    max_new_tokens: int = check(32, POSITIVE)
    temperature: float = check(1.0, TEMPERATURE)
    top_k: int = check(0, NON_NEGATIVE | "0: no top-k filter")
    top_p: float = check(1.0, TOP_P)
    ppo_epochs: int = check(2, POSITIVE)
    minibatch: int = check(8, POSITIVE)  # answers per update step per process (rollout answers must split evenly)
    clip: float = check(0.2, POSITIVE)
    value_clip: float = check(0.2, POSITIVE)
    vf_coef: float = check(0.5, NON_NEGATIVE)
    gamma: float = check(1.0, FRACTION)
    lam: float = check(0.95, FRACTION)
    whiten_advantages: bool = True
    missing_eos_penalty: float = check(1.0, NON_NEGATIVE)  # subtracted from the score of an answer cut off without an end token
    kl: KLConfig = field(default_factory=KLConfig)
    ptx_coef: float = check(0.0, NON_NEGATIVE)  # PPO-ptx: weight of a pretraining loss on `ptx_shards`
    ptx_shards: str = ""
    ptx_batch: int = check(4, POSITIVE)
    frozen_precision: Literal["fp32", "bf16"] = "fp32"  # reference and reward model
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0,
                                                                   schedule="constant"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/ppo", max_steps=50, eval_every=10,
                                                             log_every=1))

    def _checks(self, p: str) -> list[tuple[str, str]]:
        out = []
        if self.algorithm != "ppo" and self.group_size < 2:
            out.append(("group_size", f"must be >= 2 for {self.algorithm} (answers to one prompt are compared)"))
        n = self.rollout_batch * (1 if self.algorithm == "ppo" else self.group_size)
        if not out and n % self.minibatch:
            out.append(("minibatch", f"must divide the {n} answers of an iteration ({p}rollout_batch={self.rollout_batch}"
                        + ("" if self.algorithm == "ppo" else f" x {p}group_size={self.group_size}") + ")"))
        if self.ptx_coef > 0 and not self.ptx_shards:
            out.append(("ptx_shards", f"must be set when {p}ptx_coef > 0 (the pretraining shards)"))
        unused = {"run.batch_size": (RunConfig.batch_size, f"{p}rollout_batch and {p}minibatch size its batches"),
                  "run.grad_accum": (RunConfig.grad_accum, f"each {p}minibatch is one optimizer step"),
                  "run.eval_batches": (RunConfig.eval_batches, f"{p}eval_prompts sizes its evaluation"),
                  "optim.warmup_steps": (0, "its learning rate is constant"),
                  "optim.schedule": ("constant", "its learning rate is constant")}
        for key, (default, why) in unused.items():
            if getattr(getattr(self, key.split(".")[0]), key.split(".")[1]) != default:
                out.append((key, f"is not used by {self.algorithm} ({why}); leave it at {default!r}"))
        return out


@dataclass
class DPOConfig:
    policy: str = ""  # the SFT checkpoint: initial policy and frozen reference
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    beta: float = check(0.1, POSITIVE)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/dpo", max_steps=100, batch_size=4,
                                                             eval_every=25, eval_batches=0))


@dataclass
class EvaluateConfig:
    a: str = ""  # baseline checkpoint (e.g. the SFT model)
    b: str = ""  # challenger (e.g. the PPO or DPO model)
    reward_model: str = ""
    prompts: str = "data/sft/aristocrat.jsonl"
    val_every: int = check(10, HELD_OUT_EVERY)  # held-out prompts: every Nth (the SFT split)
    max_prompts: int = check(0, NON_NEGATIVE | "0: all")
    true_rule: str = ""  # a simulated annotator's rule: the true preference
    max_new_tokens: int = check(32, POSITIVE)
    out: str = check("", WRITABLE_FILE)  # write the comparison as JSON here


@dataclass
class TokenizerConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/corpus/chitchat.txt"])
    out: str = check("runs/tokenizer/tokenizer.json", OUTPUT_FILE)
    vocab_size: int = check(4096, POSITIVE)
    min_frequency: int = check(2, POSITIVE)
    jsonl_field: str = "text"
    max_chars: int = check(0, NON_NEGATIVE | "0: all")  # train on at most this many characters (0: all)


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/corpus/chitchat.txt"])
    tokenizer: str = "runs/tokenizer/tokenizer.json"
    out_dir: str = check("runs/data", OUTPUT_DIR)
    jsonl_field: str = "text"
    val_every: int = check(20, HELD_OUT_EVERY)  # every Nth document goes to validation (deterministic split)
    shard_tokens: int = check(50_000_000, POSITIVE)  # tokens per shard file


# ----------------------------------------------------------------------------- loading


COMMAND_LINE = "command line"


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build `cls` from an optional YAML file and `key=value` overrides, checking every key and
    every value. An error names the key and where its value came from: the YAML file, or the
    command line for an override."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    cli: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{COMMAND_LINE}: {item!r} is not of the form key=value")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{COMMAND_LINE}: '{key}': the value {raw!r} is not valid YAML "
                              f"({getattr(e, 'problem', None) or type(e).__name__})") from None
        except _Refused as e:
            raise ConfigError(f"{COMMAND_LINE}: '{key}': the value {raw!r} is not usable YAML ({e})") from None
        set_dotted(data, key, value, source=str(path) if path else COMMAND_LINE, origins=cli)
        cli.add(key)
    return from_dict(cls, data, source=str(path) if path else COMMAND_LINE, origins=cli)


MAX_YAML_VALUES = 100_000  # a config is small; aliases that expand past this are a "billion laughs"


class _Refused(Exception):
    """A YAML document refused by `safe_load` (duplicate key, too big once aliases expand)."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last
    silently) and counts the values aliases expand to."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise _Refused(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice (first on "
                                   f"line {seen[key]}); YAML would keep only the last")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any) -> int:
    """How many values `value` holds once every alias is expanded (shared lists and dicts counted
    each time they occur), computed without expanding; stops counting past MAX_YAML_VALUES."""
    memo: dict[int, int] = {}

    def size(v) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        if id(v) not in memo:
            memo[id(v)] = 1  # a cycle (an alias inside itself) counts once
            items = list(v.values()) if isinstance(v, dict) else v
            memo[id(v)] = min(1 + sum(size(x) for x in items), MAX_YAML_VALUES + 1)
        return memo[id(v)]

    return size(value)


def safe_load(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys and alias bombs (raises _Refused)."""
    loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    if _expanded_size(loaded) > MAX_YAML_VALUES:
        raise _Refused(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
    return loaded


def read_yaml(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty: {}), or a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a YAML config file")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{p}: not a regular file (a device, pipe or socket), not a YAML config file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    except _Refused as e:
        if str(e).startswith("line"):
            raise ConfigError(f"{p} {e}") from None
        raise ConfigError(f"{p}: not a usable YAML config ({e})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a usable YAML config (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys to values, not {_kind(loaded)}")
    return loaded


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(
        type(value), type(value).__name__)


def set_dotted(data: dict, key: str, value: Any, source: str = COMMAND_LINE, origins=None) -> None:
    """Set dotted `key` of the override `key=value`. When a section on the way holds a value
    that is not a mapping, the error blames where that value came from (`source`, the YAML
    file, unless the command line set it: `origins`)."""
    node = data
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{COMMAND_LINE}: '{key}' is not a dotted key (e.g. optim.lr)")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            section = ".".join(parts[:i + 1])
            where = _origin(section, source, origins)
            if where == COMMAND_LINE:
                raise ConfigError(f"{COMMAND_LINE}: '{key}': {section} is not a section")
            raise ConfigError(f"{where}: '{section}' must be a mapping (a section), got {_kind(nxt)}; "
                              f"so '{key}' given on the command line cannot be set")
        node = nxt
    node[parts[-1]] = value


def _origin(key: str, source: str, origins) -> str:
    """Where the value of dotted `key` came from: the command line when it, or a section
    holding it, was given there; else `source` (the YAML file)."""
    if origins:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in origins:
                return COMMAND_LINE
    return source


def from_dict(cls: type, data: dict, source: str = "config", prefix: str = "", origins=None) -> Any:
    """`cls` from a dict, checking keys, types and each field's rule. `origins` holds the dotted
    keys given on the command line (their errors say so); the rest are blamed on `source`."""
    if not isinstance(data, dict):
        key = prefix.rstrip(".")
        raise ConfigError(f"{_origin(key, source, origins)}: '{key or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            full = f"{prefix}{key}"
            raise ConfigError(f"{_origin(full, source, origins)}: unknown key '{full}' for {cls.__name__}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            # A section given in part keeps this class's own defaults for the rest (e.g. the
            # reward stage's run.max_steps=200 when only run.log_every is set), not the
            # defaults of the section's class.
            if (dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict)
                    and f.default_factory is not dataclasses.MISSING):
                value = {**to_dict(f.default_factory()), **value}
            key = f"{prefix}{f.name}"
            kwargs[f.name] = value = _coerce(hints[f.name], value, key, source, origins)
            rule = f.metadata.get("check")
            if rule is not None:
                problem = rule.problem(value)
                if problem:
                    raise ConfigError(f"{_origin(key, source, origins)}: '{key}' {problem}, got {value!r}")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults are checked too (a stage's own default may not fit)
        rule = f.metadata.get("check")
        if f.name not in data and rule is not None and not isinstance(rule, _Writable) and rule.problem(getattr(obj, f.name)):
            key = f"{prefix}{f.name}"
            raise ConfigError(f"{source}: '{key}' {rule.problem(getattr(obj, f.name))}, got {getattr(obj, f.name)!r}")
    checks = getattr(obj, "_checks", None)
    if checks is not None:
        for key, problem in checks(prefix):
            key = f"{prefix}{key}"
            value = obj
            for part in key[len(prefix):].split("."):
                value = getattr(value, part)
            raise ConfigError(f"{_origin(key, source, origins)}: '{key}' {problem}, got {value!r}")
    _check_warmup(obj, data, source, prefix, origins)
    return obj


def _check_warmup(obj: Any, data: dict, source: str, prefix: str, origins) -> None:
    """A stage's optim.warmup_steps, when given, must not exceed run.max_steps (> 0): the learning
    rate would never reach optim.lr (1e20 warm-up steps trained at lr 1e-23). A stage's own
    default warm-up, and a YAML file's warm-up when run.max_steps is shortened on the command
    line (a quick try of a configured run), are left alone."""
    optim, run = getattr(obj, "optim", None), getattr(obj, "run", None)
    if not (isinstance(optim, OptimConfig) and isinstance(run, RunConfig)):
        return
    given = data.get("optim")
    if not (isinstance(given, dict) and "warmup_steps" in given):
        return
    key = f"{prefix}optim.warmup_steps"
    if (_origin(key, source, origins) != COMMAND_LINE
            and _origin(f"{prefix}run.max_steps", source, origins) == COMMAND_LINE):
        return  # a configured run shortened on the command line (e.g. `demo pretrain.run.max_steps=1`)
    if run.max_steps > 0 and optim.warmup_steps > run.max_steps:
        raise ConfigError(f"{_origin(key, source, origins)}: '{key}' must be <= {prefix}run.max_steps="
                          f"{run.max_steps} (the learning rate would never reach {prefix}optim.lr), "
                          f"got {optim.warmup_steps!r}")


def _coerce(tp: Any, value: Any, key: str, source: str, origins=None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = _origin(key, source, origins)
    bad = ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {_short(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key + ".", origins)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source, origins)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if not isinstance(value, typing.Hashable) or value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(str, args))}, got {_short(value)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(args[0], v, f"{key}[{i}]", source, origins) for i, v in enumerate(value)] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {_short(value)}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _short(value: Any) -> str:
    """repr of a value, cut to one short line (a value may be a whole nested YAML document)."""
    r = repr(value).replace("\n", " ")
    return r if len(r) <= 80 else r[:77] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
