"""Which conversations each step uses: the SFT data's split into training and held-out prompts,
the prompts to rank, and those already in a feedback database."""
from __future__ import annotations

from pathlib import Path

from llmtrain.data.jsonl import split
from llmtrain.data.prompts import read_prompts
from llmtrain.feedback.store import FeedbackStore
from llmtrain.pipeline.config import abs_path


def held_out(cfg, base) -> tuple[list, list]:
    """The SFT data's split into (train, held-out) conversations: the held-out prompts are
    never trained on by any stage and are where every model is compared."""
    return split(read_prompts(abs_path(cfg.sft.data.train, base), columns=cfg.sft.data.columns), cfg.sft.data.val_every)


def feedback_convs(cfg, base) -> list:
    """The conversations whose answers are ranked (each asked feedback.rounds times)."""
    if abs_path(cfg.feedback.prompts, base) == abs_path(cfg.sft.data.train, base):
        convs = held_out(cfg, base)[0]  # the SFT training side: held-out prompts stay unseen
    else:
        convs = read_prompts(abs_path(cfg.feedback.prompts, base))
    return convs[: cfg.feedback.max_prompts or None]


def db_convs(db: Path) -> list:
    """The conversation of every prompt row of a feedback database (a prompt of R rounds R times)."""
    store = FeedbackStore(db)
    try:
        return [store.prompt(pid)["messages"] for pid in store.prompt_ids()]
    finally:
        store.close()
