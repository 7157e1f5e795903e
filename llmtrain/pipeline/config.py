"""The pipeline's config: one YAML nests each stage's own config, and says which RL methods run
and what the feedback step asks; STAGES is the order the run goes through."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.config import (NON_NEGATIVE, POSITIVE, TEMPERATURE, TOP_P, WRITABLE_DIR, DPOConfig, EvaluateConfig,
                             PPOConfig, PrepareConfig, PretrainConfig, RewardConfig, Rule, SFTConfig, TokenizerConfig,
                             check, load_config)
from llmtrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
RL_METHODS = ["ppo", "grpo", "rloo", "dpo"]
STAGES = ["tokenizer", "prepare", "pretrain", "sft", "candidates", "rankings", "reward", *RL_METHODS, "rounds",
          "evaluate", "report"]


@dataclass
class FeedbackStageConfig:
    prompts: str = "data/sft/aristocrat.jsonl"  # its SFT-training side gives the prompts to rank
    max_prompts: int = check(120, NON_NEGATIVE | "0: all")  # 0: all of them
    k: int = check(4, Rule(lambda v: 2 <= v <= 9, "between 2 and 9"))
    rounds: int = check(1, POSITIVE)  # each prompt answered this many times (K fresh answers, ranked separately)
    max_new_tokens: int = check(40, POSITIVE)
    temperature: float = check(1.0, TEMPERATURE)
    top_p: float = check(1.0, TOP_P)
    rule: str = "aristocrat"  # the simulated annotator's rule (llmtrain/styles.py)
    # --human: where the ranking app listens (127.0.0.1; 0: any free port)
    port: int = check(8000, Rule(lambda v: 0 <= v <= 65535, "a port number, 0 to 65535 (0: any free port)"))


@dataclass
class PipelineConfig:
    run_dir: str = check("", WRITABLE_DIR)  # empty: runs/<name>-<date>-<time>
    name: str = "demo"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    feedback: FeedbackStageConfig = field(default_factory=FeedbackStageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    methods: list[str] = field(default_factory=lambda: ["ppo", "grpo", "dpo"])  # which of ppo grpo rloo dpo run
    # Iterative RLHF: rounds of (new candidates from the policy -> rankings -> reward model continued
    # -> policy continued) after the first; round_method's policy goes on (empty: the first of methods)
    rounds: int = check(1, Rule(lambda v: 1 <= v <= 20, "between 1 and 20"))
    round_method: str = ""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: PPOConfig = field(default_factory=lambda: PPOConfig(algorithm="grpo"))
    rloo: PPOConfig = field(default_factory=lambda: PPOConfig(algorithm="rloo"))
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sample_prompts: int = check(6, NON_NEGATIVE)  # held-out prompts answered by every model in the report
    style_eval_prompts: int = check(0, NON_NEGATIVE | "0: all")  # held-out SFT prompts whose answers are style-checked (0: all)


def stages_of(cfg: PipelineConfig) -> list[str]:
    """The stages this config runs: all of STAGES but the RL methods it does not choose (and
    `rounds` with one round)."""
    return [s for s in STAGES if (s not in RL_METHODS or s in cfg.methods) and (s != "rounds" or cfg.rounds > 1)]


def method_of(cfg) -> str:
    """The RL method whose policy goes on from round to round: round_method, else the first of
    `methods`."""
    m = cfg.round_method or cfg.methods[0]
    if m not in cfg.methods:
        raise ConfigError(f"round_method={m}: not one of the methods this run trains ({', '.join(cfg.methods)})")
    return m


def abs_path(path: str, base: Path) -> str:
    """A config path relative to `base`; empty stays empty, and a Hub dataset (hf:org/name) is
    no path."""
    if not path or path.startswith("hf:"):
        return path
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def load(path: str | Path | None, overrides: list[str]) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
