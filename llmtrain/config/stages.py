"""One config per command: the training stages (pretrain, sft, classify, reward, ppo/grpo/rloo,
dpo), evaluate, and the tokenizer and data preparation, each with its own data section.

Keys mean one thing everywhere. `run.eval_batches`: batches per evaluation, 0 the whole
held-out set. `val_every`: 1 item in val_every is held out; by position (every val_every-th
line) for examples, prompts and documents, by a hash of the prompt for rankings (so all
rankings of one prompt fall on the same side). A field a stage does not read is in its
`UNUSED` table (llmtrain.config.unused) and refused when set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llmtrain.config.rules import (FRACTION, HELD_OUT_EVERY, NON_NEGATIVE, OUTPUT_DIR, OUTPUT_FILE, POSITIVE, TEMPERATURE,
                                   TOP_P, WRITABLE_FILE, check)
from llmtrain.config.sections import FreezeConfig, KLConfig, LoRAConfig, ModelConfig, OptimConfig, RunConfig
from llmtrain.config.unused import Unused


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
        return [("run.eval_batches", "must be > 0 (pretraining evaluates that many batches sampled from its "
                                     "validation split; it never reads the whole split, which 0 would mean)")] \
            if self.run.eval_batches <= 0 else []


@dataclass
class JSONLDataConfig:
    """Examples and the held-out ones. `train` / `val` name a data source: a JSONL, JSON, Parquet
    or CSV file, a folder of them, a folder written by datasets' save_to_disk, or a Hub dataset
    hf:org/name[:config][@split] (llmtrain/data/sources.py)."""
    train: str = ""
    val: str = ""  # a held-out file; empty: hold out 1 example in val_every of `train`, by position (every val_every-th)
    val_every: int = check(10, HELD_OUT_EVERY)
    max_len: int = check(0, NON_NEGATIVE | "0: the context window")  # 0: the model's context window
    skip_bad_lines: bool = False
    # the data's own field names: {ours: theirs}, e.g. {prompt: question, response: answer}
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class SFTDataConfig(JSONLDataConfig):
    train: str = "data/sft/aristocrat.jsonl"


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
class ClassifyDataConfig(JSONLDataConfig):
    train: str = "data/classify/topics.jsonl"
    val_every: int = check(5, HELD_OUT_EVERY)


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
    # a held-out file; empty: hold out 1 prompt in val_every, picked by a hash of the prompt so that
    # all rankings of one prompt stay together (on the training side or held out)
    val: str = ""
    val_every: int = check(5, HELD_OUT_EVERY)
    max_len: int = check(0, NON_NEGATIVE | "0: the context window")  # 0: the model's context window; longer texts keep their end
    min_score_gap: float = check(0.0, NON_NEGATIVE)  # with rated candidates: drop pairs whose ratings differ less
    include_simulated: bool = True
    skip_bad_lines: bool = False
    # the data's own field names: {ours: theirs}, e.g. {prompt: question, response: answer}
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class RewardConfig:
    init_from: str = ""  # the fine-tuned (SFT) checkpoint: backbone of the reward model (or a reward model to continue)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/reward", max_steps=200, batch_size=4,
                                                             eval_every=50, eval_batches=0))
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    margin_scale: float = check(0.0, NON_NEGATIVE)  # margin = scale x rating gap, for rated candidates
    norm_prompts: int = check(32, NON_NEGATIVE)  # held-out prompts whose SFT answers set the reward's zero
    norm_policy: str = ""  # the model whose answers those are (empty: init_from; set it when init_from is a reward model)
    norm_samples: int = check(2, POSITIVE)  # SFT answers sampled per prompt for that
    norm_max_new_tokens: int = check(48, POSITIVE)


# With LoRA only the adapters train: every base weight is frozen already.
FREEZE_WITH_LORA = tuple(Unused(f"freeze.{key}", "LoRA trains its adapters only; every base weight stays frozen",
                                "with {p}lora.enabled", lambda c: c.lora.enabled) for key in ("patterns", "first_layers"))


@dataclass
class PPOConfig:
    """The RL stage: PPO (policy + value model, GAE) or critic-free GRPO / RLOO (G answers per
    prompt, each judged against the others to the same prompt; no value model)."""
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    policy: str = ""  # the SFT checkpoint: initial policy and frozen reference
    reward_model: str = ""  # the reward-model checkpoint: scores, and the value head's start
    prompts: str = "data/sft/aristocrat.jsonl"  # prompts ({"prompt"} / {"messages"} / preference lines; answers ignored), any data source
    prompt_columns: dict[str, str] = field(default_factory=dict)  # the prompts' own field names: {ours: theirs}
    # 1 prompt in val_every is held out for evaluation, by position (every val_every-th: the SFT split, so they are unseen)
    val_every: int = check(10, HELD_OUT_EVERY)
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
    # The precision of the reference and the reward model (frozen), and of the policy's copy the
    # rollouts sample from (llmtrain.model.decoder); what trains keeps fp32 weights either way.
    # auto: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with
    # AVX512-BF16 or AMX) and the policy has 8M parameters or more (rl_models.AUTO_BF16_MIN_PARAMS),
    # else run.precision
    frozen_precision: Literal["auto", "fp32", "bf16"] = "auto"
    rollout_precision: Literal["auto", "fp32", "bf16"] = "auto"
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
        return out

    @property
    def stage(self) -> str:
        return self.algorithm

    UNUSED: ClassVar[tuple[Unused, ...]] = (
        Unused("run.batch_size", "{p}rollout_batch and {p}minibatch size its batches"),
        Unused("run.grad_accum", "each {p}minibatch is one optimizer step"),
        Unused("run.eval_batches", "{p}eval_prompts sizes its evaluation"),
        Unused("optim.warmup_steps", "its learning rate is constant"),
        Unused("optim.schedule", "its learning rate is constant"),
        Unused("run.compile", "generation changes shapes every step"),
        Unused("group_size", "one answer per prompt, judged by the value model", "", lambda c: c.algorithm == "ppo"),
        *(Unused(key, "no value model: GRPO and RLOO judge an answer against the others to its prompt",
                 "", lambda c: c.algorithm != "ppo")
          for key in ("value_clip", "vf_coef", "gamma", "lam", "whiten_advantages")),
        *(Unused(key, "no pretraining loss", "with {p}ptx_coef=0", lambda c: c.ptx_coef == 0)
          for key in ("ptx_shards", "ptx_batch")),
        *FREEZE_WITH_LORA,
    )


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

    stage: ClassVar[str] = "dpo"
    UNUSED: ClassVar[tuple[Unused, ...]] = FREEZE_WITH_LORA


@dataclass
class EvaluateConfig:
    a: str = ""  # baseline checkpoint (e.g. the SFT model)
    b: str = ""  # challenger (e.g. the PPO or DPO model)
    reward_model: str = ""
    prompts: str = "data/sft/aristocrat.jsonl"
    prompt_columns: dict[str, str] = field(default_factory=dict)  # the prompts' own field names: {ours: theirs}
    val_every: int = check(10, HELD_OUT_EVERY)  # 1 prompt in val_every held out, by position (the SFT split)
    max_prompts: int = check(0, NON_NEGATIVE | "0: all")
    true_rule: str = ""  # a simulated annotator's rule: the true preference
    max_new_tokens: int = check(32, POSITIVE)
    samples: int = check(0, NON_NEGATIVE | "0: greedy answers only")  # answers per prompt also sampled at temperature 1
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
    val_every: int = check(20, HELD_OUT_EVERY)  # 1 document in val_every goes to validation, by position (every val_every-th)
    shard_tokens: int = check(50_000_000, POSITIVE)  # tokens per shard file

