"""Prompts for generation (feedback candidates, PPO rollouts, evaluation): JSONL lines
{"prompt": ..., ["system": ...]} or {"messages": [...]}. Any "response" and any trailing
assistant turns are ignored, so an SFT file serves as a prompt file too."""
from __future__ import annotations

from pathlib import Path

from llmtrain.data.jsonl import read_jsonl
from llmtrain.errors import ConfigError
from llmtrain.tokenizer import ROLES, Tokenizer, render_chat


def parse_prompt(obj) -> list[dict]:
    if isinstance(obj, dict) and "prompt" in obj and "messages" in obj:
        raise ValueError("has both 'prompt' and 'messages': ambiguous, give one or the other")
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
        if isinstance(obj.get("system"), str):
            msgs.insert(0, {"role": "system", "content": obj["system"]})
        return msgs
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        if not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            raise ValueError("'messages' must be a list of {role, content} objects")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError("the conversation must end with a user message")
        return msgs
    raise ValueError("expected 'prompt' (a string) or 'messages'")


def read_prompts(path: str | Path, skip_bad_lines: bool = False) -> list[list[dict]]:
    return [m for _, m in read_jsonl(path, parse_prompt, skip_bad_lines)[0]]


def last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


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
