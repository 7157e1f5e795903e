"""The record formats other tools publish, turned into our conversations (no I/O here; the
files are read by data/sources.py):

- message lists: [{"role": "system"|"user"|"assistant", "content": "..."}, ...], checked here
  with errors naming the field (`messages[2].role`);
- TRL's fields that are a string or a message list (`prompt`, `completion`, `chosen`,
  `rejected`): a string is one turn (user for a prompt, assistant for an answer);
- preference pairs (`preference_pair`):
    {"prompt": ..., "chosen": ..., "rejected": ...}   TRL, UltraFeedback binarized: strings or
        message lists; an answer list that repeats the prompt (UltraFeedback's chosen/rejected
        are [user prompt, assistant answer]) has the prompt dropped, so one answer is left;
    {"chosen": [...], "rejected": [...]}               TRL's implicit prompt: two conversations
        that share every turn but the last assistant answer;
    {"chosen": "...", "rejected": "..."}              Anthropic HH-RLHF: two transcripts
        "\\n\\nHuman: ...\\n\\nAssistant: ..." that share everything up to the last
        "\\n\\nAssistant:" (the prompt), each followed by its answer.
"""
from __future__ import annotations

import math
import re

from llmtrain.tokenizer import ROLES

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def check_messages(msgs, field: str) -> list[dict]:
    """A message list -> [{role, content}] (a "name" key is allowed and dropped, and so is any key
    whose value is null: Parquet and datasets give every message every field of the column's
    struct, e.g. tool_calls: null), or ValueError naming `field`, the message and the key."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"'{field}' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{field}[{i}] must be an object with 'role' and 'content'")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v is not None)
        if extra:
            raise ValueError(f"{field}[{i}] has {extra[0]!r}, which is not read (only role and content: tool calls "
                             "and other message fields are not supported)")
        if m["role"] not in ROLES:
            raise ValueError(f"{field}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{field}[{i}].content is not a string")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def turns(value, field: str, role: str) -> list[dict]:
    """A TRL field: a string (one `role` turn) or a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return check_messages(value, field)
    raise ValueError(f"'{field}' is missing or not a string or a list of messages")


def until_user(msgs: list[dict], field: str = "") -> list[dict]:
    """A prompt conversation: trailing assistant turns dropped; it must end with a user turn."""
    msgs = list(msgs)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message" + (f" (in '{field}')" if field else ""))
    return msgs


def last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def hh_transcript(text: str, field: str) -> list[dict]:
    """An HH-RLHF transcript "\\n\\nHuman: a\\n\\nAssistant: b" -> messages (contents stripped)."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"'prompt' is missing and '{field}' is not an HH-RLHF transcript "
                         f"('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _answer(msgs: list[dict], prompt: list[dict], field: str) -> str:
    """The one assistant answer of `msgs` once a leading copy of the prompt is dropped."""
    if len(msgs) > len(prompt) and msgs[:len(prompt)] == prompt:
        msgs = msgs[len(prompt):]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"'{field}' must be one assistant answer, after a copy of the prompt if it repeats it "
                         f"(it holds {len(msgs)} other message(s))")
    return msgs[0]["content"]


def _score(obj: dict, key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, str):  # CSV cells are text
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"'{key}' must be a number") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"'{key}' must be a finite number")
    return v


def preference_pair(obj: dict) -> tuple[list[dict], list[str], list[float] | None, str]:
    """A chosen/rejected record -> (prompt messages, [chosen answer, rejected answer], scores or
    None, which format it was). Scores come from UltraFeedback's `score_chosen`/`score_rejected`
    when both are given (they feed data.min_score_gap and margin_scale); every other column
    (`messages`, which repeats prompt + chosen; `prompt_id`; ...) is ignored."""
    for k in ("chosen", "rejected"):
        if k not in obj:
            raise ValueError(f"'{k}' is missing")
    c, r = obj["chosen"], obj["rejected"]
    if "prompt" in obj:
        prompt = turns(obj["prompt"], "prompt", "user")
        if prompt[-1]["role"] != "user":
            raise ValueError("the conversation in 'prompt' must end with a user message")
        answers = [_answer(turns(c, "chosen", "assistant"), prompt, "chosen"),
                   _answer(turns(r, "rejected", "assistant"), prompt, "rejected")]
        fmt = "prompt-chosen-rejected"
    else:
        if isinstance(c, str) and isinstance(r, str):
            ct, rt, fmt = hh_transcript(c, "chosen"), hh_transcript(r, "rejected"), "hh-rlhf"
        else:
            ct, rt, fmt = turns(c, "chosen", "assistant"), turns(r, "rejected", "assistant"), "chosen-rejected"
        if ct[:-1] != rt[:-1]:
            raise ValueError("'chosen' and 'rejected' do not share the conversation before their last answer")
        if ct[-1]["role"] != "assistant" or rt[-1]["role"] != "assistant":
            raise ValueError("'chosen' and 'rejected' must each end with an assistant answer")
        prompt = ct[:-1]
        if not prompt or prompt[-1]["role"] != "user":
            raise ValueError("the conversation before the answers must end with a user message")
        answers = [ct[-1]["content"], rt[-1]["content"]]
    sc, sr = _score(obj, "score_chosen"), _score(obj, "score_rejected")
    scores = None if sc is None or sr is None else [sc, sr]
    if scores and sc < sr:
        raise ValueError(f"'score_chosen' ({sc}) is below 'score_rejected' ({sr})")
    return prompt, answers, scores, fmt
