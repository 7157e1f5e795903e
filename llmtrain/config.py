"""Typed configuration: one dataclass per stage, nesting Model/Optim/Data/Run configs.

A YAML file fills a stage config and ``key=value`` overrides (dotted for nested fields,
e.g. ``optim.lr=3e-4``) are applied on top. Every key is checked against the dataclass
fields and every value against the field's type, so a typo is a one-line error naming the
key instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtrain.errors import ConfigError


@dataclass
class ModelConfig:
    """A Llama-style decoder. Field names are short; `hf_config()` maps them to HF names."""

    vocab_size: int = 0  # 0: taken from the tokenizer / data at build time
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (plain multi-head attention)
    ffn_dim: int = 0  # 0: about 8/3 * dim rounded up to a multiple of 64 (SwiGLU)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Features of imported Hugging Face models (llmtrain/interop); the defaults change nothing.
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj never has one
    rope_scaling: Literal["none", "llama3"] = "none"  # "llama3": Llama 3.1's frequency-dependent scaling
    rope_factor: float = 8.0  # llama3: how much the low frequencies are stretched
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / high are kept
    rope_original_max_len: int = 8192  # llama3: the context the model was first trained on

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
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1  # matrices only; norms and biases get none
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"


@dataclass
class RunConfig:
    """What every training stage shares: where, how long, how big, how precise."""

    out_dir: str = "runs/pretrain"
    max_steps: int = 1000
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20  # batches per evaluation (SFT: 0 = the whole held-out set)
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2  # step checkpoints kept on disk
    resume: bool = False
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    tensorboard: bool = False
    threads: int = 0  # CPU intra-op threads; 0 leaves torch's default


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


@dataclass
class FreezeConfig:
    patterns: list[str] = field(default_factory=list)  # globs over parameter names
    first_layers: int = 0  # freeze blocks 0 .. N-1


@dataclass
class SFTDataConfig:
    train: str = "data/sft/aristocrat.jsonl"
    val: str = ""  # empty: hold out every val_every-th example of `train`
    val_every: int = 10
    max_len: int = 0  # 0: the model's context window
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
    sample_prompts: int = 4  # held-out prompts whose answers are logged at each evaluation
    sample_tokens: int = 48


@dataclass
class ClassifyDataConfig:
    train: str = "data/classify/topics.jsonl"
    val: str = ""  # empty: hold out every val_every-th example of `train`
    val_every: int = 5
    max_len: int = 0  # 0: the model's context window
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
    val_every: int = 5
    max_len: int = 0  # 0: the model's context window; longer texts keep their end
    min_score_gap: float = 0.0  # with rated candidates: drop pairs whose ratings differ less
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
    margin_scale: float = 0.0  # margin = scale x rating gap, for rated candidates
    norm_prompts: int = 32  # held-out prompts whose SFT answers set the reward's zero
    norm_samples: int = 2  # SFT answers sampled per prompt for that
    norm_max_new_tokens: int = 48


@dataclass
class KLConfig:
    beta: float = 0.05  # initial (or fixed) KL coefficient
    # Per-token KL estimate (llmtrain.rl.kl_estimate; both are logged) and where it acts: a
    # penalty in the reward, or beta x mean k3 as a loss term. auto: GRPO k3 in the loss (as
    # DeepSeekMath), PPO and RLOO k1 in the reward (as InstructGPT and RLOO).
    estimator: Literal["auto", "k1", "k3"] = "auto"
    placement: Literal["auto", "reward", "loss"] = "auto"
    adaptive: bool = False
    target: float = 6.0  # the KL (nats per response) to stay under; adaptive: the one to hold
    horizon: int = 10000  # adaptive: how fast beta moves (in rollouts)


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class PPOConfig:
    """The RL stage: PPO (policy + value model, GAE) or critic-free GRPO / RLOO (G answers per
    prompt, each judged against the others to the same prompt; no value model)."""
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    policy: str = ""  # the SFT checkpoint: initial policy and frozen reference
    reward_model: str = ""  # the reward-model checkpoint: scores, and the value head's start
    prompts: str = "data/sft/aristocrat.jsonl"  # JSONL prompts ({"prompt"} / {"messages"}; responses ignored)
    val_every: int = 10  # every Nth prompt is held out for evaluation (the SFT split, so they are unseen)
    eval_prompts: int = 32  # held-out prompts per evaluation (0: all)
    true_rule: str = ""  # a simulated annotator's rule, the "true" preference to watch for reward hacking
    rollout_batch: int = 16  # prompts per iteration per process
    group_size: int = 4  # grpo / rloo: answers sampled per prompt (rollout_batch x group_size answers)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 2
    minibatch: int = 8  # answers per update step per process (rollout answers must split evenly)
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0  # subtracted from the score of an answer cut off without an end token
    kl: KLConfig = field(default_factory=KLConfig)
    ptx_coef: float = 0.0  # PPO-ptx: weight of a pretraining loss on `ptx_shards`
    ptx_shards: str = ""
    ptx_batch: int = 4
    frozen_precision: Literal["fp32", "bf16"] = "fp32"  # reference and reward model
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0,
                                                                   schedule="constant"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/ppo", max_steps=50, eval_every=10,
                                                             log_every=1))


@dataclass
class DPOConfig:
    policy: str = ""  # the SFT checkpoint: initial policy and frozen reference
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    beta: float = 0.1
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
    val_every: int = 10  # held-out prompts: every Nth (the SFT split)
    max_prompts: int = 0
    true_rule: str = ""  # a simulated annotator's rule: the true preference
    max_new_tokens: int = 32
    out: str = ""  # write the comparison as JSON here


@dataclass
class TokenizerConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/corpus/chitchat.txt"])
    out: str = "runs/tokenizer/tokenizer.json"
    vocab_size: int = 4096
    min_frequency: int = 2
    jsonl_field: str = "text"
    max_chars: int = 0  # train on at most this many characters (0: all)


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=lambda: ["data/corpus/chitchat.txt"])
    tokenizer: str = "runs/tokenizer/tokenizer.json"
    out_dir: str = "runs/data"
    jsonl_field: str = "text"
    val_every: int = 20  # every Nth document goes to validation (deterministic split)
    shard_tokens: int = 50_000_000  # tokens per shard file


# ----------------------------------------------------------------------------- loading


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build `cls` from an optional YAML file and `key=value` overrides, checking every key."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, data, source=str(path) if path else "overrides")


def set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def from_dict(cls: type, data: dict, source: str = "config", prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' for {cls.__name__}{hint}")
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
            kwargs[f.name] = _coerce(hints[f.name], value, f"{prefix}{f.name}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
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
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


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
