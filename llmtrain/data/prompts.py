"""Prompts for generation (feedback candidates, PPO rollouts, evaluation): JSONL lines
{"prompt": ..., ["system": ...]} or {"messages": [...]}. Any "response" and any trailing
assistant turns are ignored, so an SFT file serves as a prompt file too."""
from __future__ import annotations

from pathlib import Path

from llmtrain.data.sft import read_jsonl
from llmtrain.tokenizer import ROLES


def parse_prompt(obj) -> list[dict]:
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
