"""Run a chain of stages from one YAML; `llmtrain demo` runs the shipped default.

Each stage's own config is nested in the pipeline config; the pipeline only decides where
each stage writes (inside one run directory) and hands outputs on through those paths.
A stage whose output is already complete is skipped, so a killed pipeline continues.

So far the chain is: tokenizer -> prepare -> pretrain -> sft -> style check and samples.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.config import PrepareConfig, PretrainConfig, SFTConfig, TokenizerConfig, load_config
from llmtrain.metrics import fmt_duration

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


@dataclass
class PipelineConfig:
    run_dir: str = ""  # empty: runs/<name>-<date>-<time>
    name: str = "demo"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["How are you doing today?"])
    sample_tokens: int = 40
    style_eval_prompts: int = 0  # held-out SFT prompts whose greedy answers are style-checked (0: all)


def _abs(path: str, base: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def run(cfg: PipelineConfig, base: Path = REPO) -> Path:
    """Run the chain; data paths in the config are relative to `base` (the repo for the demo)."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"pipeline '{cfg.name}': all outputs in {run_dir.resolve()}")
    timings: dict[str, float] = {}

    tok_path = run_dir / "tokenizer" / "tokenizer.json"
    shard_dir = run_dir / "data"
    pretrain_dir = run_dir / "pretrain"
    sft_dir = run_dir / "sft"

    def stage(name: str, done: bool, fn) -> None:
        if done:
            print(f"[{name}] already complete, skipped")
            return
        print(f"[{name}] ...")
        t = time.time()
        fn()
        timings[name] = time.time() - t
        print(f"[{name}] done in {fmt_duration(timings[name])}")

    def do_tokenizer():
        from llmtrain.data.corpus import iter_documents
        from llmtrain.tokenizer import train_tokenizer

        c = cfg.tokenizer
        train_tokenizer(iter_documents([_abs(i, base) for i in c.inputs], c.jsonl_field), c.vocab_size, tok_path,
                        c.min_frequency, c.max_chars)

    def do_prepare():
        from llmtrain.data.pretrain import prepare

        c = cfg.prepare
        prepare([_abs(i, base) for i in c.inputs], str(tok_path), str(shard_dir), c.jsonl_field, c.val_every, c.shard_tokens)

    def do_pretrain():
        from llmtrain.stages import pretrain

        c = dataclasses.replace(cfg.pretrain)
        c.data.shards = str(shard_dir)
        c.run.out_dir = str(pretrain_dir)
        c.run.resume = True  # a killed pipeline continues from the last step checkpoint
        pretrain.main(c)

    def do_sft():
        from llmtrain.stages import sft

        c = cfg.sft
        c.init_from = str(pretrain_dir)
        c.data.train = _abs(c.data.train, base)
        if c.data.val:
            c.data.val = _abs(c.data.val, base)
        c.run.out_dir = str(sft_dir)
        c.run.resume = True
        sft.main(c)

    stage("tokenizer", tok_path.is_file(), do_tokenizer)
    stage("prepare", (shard_dir / "meta.json").is_file(), do_prepare)
    stage("pretrain", _finished(pretrain_dir, cfg.pretrain.run.max_steps), do_pretrain)
    stage("sft", _finished(sft_dir, cfg.sft.run.max_steps), do_sft)

    samples = _samples(pretrain_dir, cfg.sample_prompts, cfg.sample_tokens)
    print("\nsamples from the pretrained model:")
    for p, s in samples.items():
        print(f"  {p!r} -> {s!r}")
    style = style_check(cfg.sft, base, {"pretrain": pretrain_dir, "sft": sft_dir}, cfg.style_eval_prompts)
    (run_dir / "samples.json").write_text(json.dumps({"pretrain": samples, "style": style}, indent=2))
    for name, r in style["models"].items():
        print(f"style check ({style['rule']}): {name} {r['hits']}/{r['n']} = {r['rate']:.0%} of held-out answers")
    for q, a, b in list(zip(style["prompts"], style["models"]["pretrain"]["answers"], style["models"]["sft"]["answers"]))[:4]:
        print(f"  Q: {q}\n    pretrained: {a}\n    fine-tuned: {b}")
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    print("\ntime per stage: " + ", ".join(f"{k} {fmt_duration(v)}" for k, v in timings.items()))
    return run_dir


def style_check(sft_cfg: SFTConfig, base: Path, models: dict[str, Path], limit: int = 0) -> dict:
    """Greedy answers of each model to the held-out SFT prompts, checked for the target style."""
    from llmtrain import checkpoint
    from llmtrain.data import sft as sft_data
    from llmtrain.model import Transformer
    from llmtrain.stages.sft import _last_user, sample_answers
    from llmtrain.styles import is_aristocratic
    from llmtrain.tokenizer import Tokenizer

    d = sft_cfg.data
    if d.val:
        held_out, _ = sft_data.read_conversations(_abs(d.val, base), d.skip_bad_lines)
    else:
        convs, _ = sft_data.read_conversations(_abs(d.train, base), d.skip_bad_lines)
        held_out = sft_data.split(convs, d.val_every)[1]
    convs = [m for _, m in held_out][: limit or None]
    out = {"rule": "at least one marker phrase of llmtrain.styles.ARISTOCRAT_MARKERS",
           "prompts": [_last_user(c) for c in convs], "models": {}}
    for name, ckpt in models.items():
        tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
        model = Transformer(checkpoint.model_config(ckpt))
        checkpoint.load_weights(ckpt, model)
        answers = []
        for i in range(0, len(convs), 32):
            answers += sample_answers(model, tok, convs[i:i + 32], sft_cfg.sample_tokens)
        hits = sum(map(is_aristocratic, answers))
        out["models"][name] = {"hits": hits, "n": len(answers), "rate": hits / max(1, len(answers)), "answers": answers}
    return out


def _finished(run_dir: Path, max_steps: int) -> bool:
    from llmtrain import checkpoint

    steps = checkpoint.step_dirs(run_dir)
    return bool(steps) and checkpoint.read_meta(steps[-1])["step"] >= max_steps


def _samples(ckpt: Path, prompts: list[str], max_new: int) -> dict[str, str]:
    import torch

    from llmtrain import checkpoint
    from llmtrain.generate import SamplingConfig, generate
    from llmtrain.model import Transformer
    from llmtrain.tokenizer import Tokenizer

    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
    model = Transformer(checkpoint.model_config(ckpt))
    checkpoint.load_weights(ckpt, model)
    s = SamplingConfig(max_new_tokens=max_new, temperature=0.8, top_p=0.95, stop_ids=(tok.eos_id,))
    outs = generate(model, [[tok.bos_id, *tok.encode(p)] for p in prompts], s, pad_id=tok.pad_id,
                    generator=torch.Generator().manual_seed(0))
    return {p: tok.decode(o, skip_special=True) for p, o in zip(prompts, outs)}


def load(path: str | Path | None, overrides: list[str]) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
