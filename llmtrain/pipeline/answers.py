"""Greedy answers of each model to the held-out prompts: the style check after SFT and the
report's answers side by side. Models load lazily (torch), inside the functions."""
from __future__ import annotations

from pathlib import Path

from llmtrain.pipeline.prompts import held_out
from llmtrain.styles import is_aristocratic


def style_check(cfg, base: Path, models: dict[str, Path]) -> dict:
    """Greedy answers of each model to the held-out SFT prompts, checked for the target style."""
    convs = held_out(cfg, base)[1][: cfg.style_eval_prompts or None]
    out = {"rule": "at least one marker phrase of llmtrain.styles.ARISTOCRAT_MARKERS",
           "prompts": [c[-1]["content"] for c in convs], "models": {}}
    for name, ckpt in models.items():
        texts = model_answers(ckpt, convs, cfg.sft.sample_tokens)
        hits = sum(map(is_aristocratic, texts))
        out["models"][name] = {"hits": hits, "n": len(texts), "rate": hits / max(1, len(texts)), "answers": texts}
    return out


def model_answers(ckpt: Path, convs: list, max_new: int) -> list[str]:
    """The checkpoint's greedy answers to `convs`."""
    from llmtrain import checkpoint
    from llmtrain.generate import greedy_answers
    from llmtrain.tokenizer import Tokenizer, render_chat

    tok = Tokenizer.load(checkpoint.tokenizer_of(ckpt))
    model = checkpoint.load_transformer(ckpt)
    # As SFT's sample answers: a prompt too long is cut from the left.
    prompts = [render_chat(tok, c, add_generation_prompt=True)[0] for c in convs]
    return [text for text, _ in greedy_answers(model, tok, prompts, max_new)]


def answers_side_by_side(cfg, base: Path, r) -> list[dict]:
    """The report's samples: each model's answer to the first held-out prompts, one row a prompt."""
    convs = held_out(cfg, base)[1][: cfg.sample_prompts]
    models = {"pretrained": r.pretrain, "SFT": r.sft, **{m.upper(): r.root / m for m in cfg.methods}}
    answers = {name: model_answers(ckpt, convs, cfg.sft.sample_tokens) for name, ckpt in models.items()}
    return [{"prompt": c[-1]["content"], **{name: answers[name][i] for name in models}} for i, c in enumerate(convs)]
