"""Stream documents out of text files, directories and JSONL files, never the whole corpus.

- `.txt`, `.md`: a document is a block of lines ended by a blank line (or the end of file).
- `.jsonl`: one JSON object per line; the document is its `field` (default "text").
- a directory: every such file under it, in sorted order (so the stream is deterministic).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llmtrain.data.jsonl import jsonl_lines, loads_line
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
