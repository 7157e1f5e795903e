"""Stream documents out of text files, directories and JSONL files, never the whole corpus.

- `.txt`, `.md`: a document is a block of lines ended by a blank line (or the end of file).
- `.jsonl`: one JSON object per line; the document is its `field` (default "text").
- a directory: every such file under it, in sorted order (so the stream is deterministic).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llmtrain.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


def list_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{p}: no .txt, .md or .jsonl files in this directory")
            files += found
        elif p.exists() and not p.is_file():
            raise DataError(f"{p}: not a regular file (a device, pipe or socket)")
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise DataError(f"{p}: unsupported file type {p.suffix!r} (expected .txt, .md or .jsonl)")
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    return files


def iter_documents(inputs: list[str], jsonl_field: str = "text") -> Iterator[str]:
    for f in list_files(inputs):
        if f.suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(f, jsonl_field)
        else:
            yield from _iter_text(f)


def _iter_text(path: Path) -> Iterator[str]:
    block: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if block:
        yield "".join(block).rstrip("\n")


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for n, line in jsonl_lines(path):
        try:
            obj = loads_line(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise DataError(f"{path}:{n}: {e}") from None
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{path}:{n}: no field '{field}' in this line")
        if not isinstance(obj[field], str):
            raise DataError(f"{path}:{n}: field '{field}' is not a string")
        yield obj[field]


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
