"""Prompts for generation (feedback candidates, PPO rollouts, evaluation), from any record that
holds one (any source data/sources.py reads):
    {"prompt": "...", ["system": ...]} or {"prompt": [messages]}   (a "response" or a
        "completion" beside it is ignored, so an SFT file serves as a prompt file too)
    {"messages": [...]}                  trailing assistant turns are dropped
    a preference record: our K-way ranking line (its conversation), or prompt/chosen/rejected,
        HH-RLHF chosen/rejected (the prompt they share; data/formats.py)."""
from __future__ import annotations

from pathlib import Path

from llmtrain.data.formats import check_messages, last_user, preference_pair, until_user
from llmtrain.data.sources import read_records
from llmtrain.errors import ConfigError
from llmtrain.tokenizer import Tokenizer, render_chat

__all__ = ["parse_prompt", "read_prompts", "last_user", "prompt_room", "fit_prompts"]


def parse_prompt(obj) -> list[dict]:
    if not isinstance(obj, dict):
        raise ValueError("expected 'prompt' (a string) or 'messages'")
    if "chosen" in obj and "rejected" in obj and "ranked" not in obj:
        return preference_pair(obj)[0]
    if "ranked" in obj and "messages" in obj:  # our ranking lines carry both; the prompt is last_user(messages)
        obj = {k: v for k, v in obj.items() if k != "prompt"}
    if "prompt" in obj and "messages" in obj:
        raise ValueError("has both 'prompt' and 'messages': ambiguous, give one or the other")
    if isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
        if isinstance(obj.get("system"), str):
            msgs.insert(0, {"role": "system", "content": obj["system"]})
        return msgs
    if isinstance(obj.get("prompt"), list):  # TRL's conversational prompt
        return until_user(check_messages(obj["prompt"], "prompt"), "prompt")
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        return until_user(check_messages(obj["messages"], "messages"))
    raise ValueError("expected 'prompt' (a string) or 'messages'")


def read_prompts(path: str | Path, skip_bad_lines: bool = False, columns: dict | None = None) -> list[list[dict]]:
    return [m for _, m in read_records(path, parse_prompt, skip_bad_lines=skip_bad_lines, columns=columns)[0]]


# ----------------------------------------------------------------------------- lengths, checked up front

def prompt_room(ctx: int, max_new: int, key: str, where: str = "") -> int:
    """The most tokens a prompt may have so that `max_new` answer tokens still fit the context
    window of `ctx` tokens. `max_new` that leaves no room at all is a one-line ConfigError naming
    `key` (as the user types it) and `where` (e.g. " of runs/sft")."""
    if max_new >= ctx:
        raise ConfigError(f"{key}={max_new} leaves no room for a prompt in the context window of {ctx} tokens"
                          f"{where}; give at most {ctx - 1}")
    return min(ctx - max(max_new, 0), ctx - 1)


def fit_prompts(tok: Tokenizer, convs: list[list[dict]], room: int) -> tuple[list[list[dict]], list[int]]:
    """Split prompts by length: -> (the conversations whose rendered prompt, generation prompt
    included, has at most `room` tokens, in order; the token counts of those that do not)."""
    kept, long = [], []
    for c in convs:
        n = len(render_chat(tok, c, add_generation_prompt=True)[0])
        if n <= room:
            kept.append(c)
        else:
            long.append(n)
    return kept, long
