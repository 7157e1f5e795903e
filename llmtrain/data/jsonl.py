"""JSONL data files, whatever their records: UTF-8 lines (a DataError names file and line),
json.loads with a nesting cap and no lone surrogates, and the deterministic held-out split every
reader shares.

Every JSONL line any kind of data reads comes through here: pretraining corpora
(data/corpus.py), and through data/sources.py's read_records conversations, prompts, rankings,
labelled texts and the CLI's --input files.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmtrain.errors import DataError

MAX_JSON_DEPTH = 64  # data lines are flat: deeper nesting is refused before the parser recurses


def jsonl_lines(path: Path):
    """(line number, text) of the non-blank lines of a UTF-8 file; a DataError naming the file and
    line when the bytes are not UTF-8 or the file cannot be read."""
    n = 0
    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                line = raw.decode("utf-8")
                if line.strip():
                    yield n, line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def loads_line(line: str):
    """json.loads of one data line; nesting deeper than MAX_JSON_DEPTH is a ValueError (Python's
    parser would recurse until RecursionError)."""
    depth = deepest = 0
    in_str = esc = False
    if line.count("[") + line.count("{") > MAX_JSON_DEPTH:  # only then count properly
        for ch in line:
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
                if deepest > MAX_JSON_DEPTH:
                    raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
            elif ch in "]}":
                depth -= 1
    obj = json.loads(line)
    if "\\u" in line:  # a lone surrogate can only come from a \uD8xx escape (the bytes were UTF-8)
        where = _surrogate_at(obj)
        if where is not None:
            raise ValueError(f"{where} holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), not text")
    return obj


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _surrogate_at(obj, path: str = "") -> str | None:
    """Where in a parsed JSON value a string (value or key) holds a lone surrogate, named as a
    field path ("field 'prompt'", "field 'messages[0].content'"), or None."""
    stack = [(obj, path)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if has_surrogate(v):
                return f"field '{at}'" if at else "the line"
        elif isinstance(v, dict):
            for k, x in v.items():
                if has_surrogate(k):
                    return f"a key of {'field ' + repr(at) if at else 'the line'}"
                stack.append((x, f"{at}.{k}" if at else k))
        elif isinstance(v, list):
            stack += [(x, f"{at}[{i}]") for i, x in enumerate(v)]
    return None


def split(examples: list, val_every: int) -> tuple[list, list]:
    """Every val_every-th example (1-based) is held out; deterministic."""
    val = [e for i, e in enumerate(examples, 1) if i % val_every == 0]
    train = [e for i, e in enumerate(examples, 1) if i % val_every != 0]
    return train, val
