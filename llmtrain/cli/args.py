"""Checks shared by the commands, made before a command reads or writes anything.

A flag is checked by the rule its config field follows (llmtrain.config), so `--top-p 2` is refused
as `sampling.top_p=2` would be, in one line naming the flag; --db and --output paths are checked up
front; a command line whose bytes are not UTF-8 is named before argparse sees it.

llmtrain.config is imported lazily, inside each check: it takes 50 ms, and `llmtrain --help`
answers without it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from llmtrain.data.jsonl import has_surrogate
from llmtrain.errors import ConfigError


def config_args(p: argparse.ArgumentParser) -> None:
    """`-c cfg.yaml key=value ...`: the arguments of every command that reads a config."""
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. optim.lr=3e-4")


def check_flags(**flags) -> None:
    """Command-line flags against the rules their config fields follow (llmtrain.config):
    `check_flags(**{"--top-p": (value, TOP_P)})`; a one-line ConfigError naming the flag."""
    from llmtrain.config import COMMAND_LINE

    for name, (value, rule) in flags.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{COMMAND_LINE}: {name} must be a finite number, got {value}")
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{COMMAND_LINE}: {name} {problem}, got {value!r}")


def sampling_flags(args) -> None:
    """The sampling flags of `generate`, `chat` and `feedback generate`."""
    from llmtrain.config import DEVICE, NON_NEGATIVE, POSITIVE, SEED, TEMPERATURE, TOP_P

    check_flags(**{"--temperature": (args.temperature, TEMPERATURE), "--top-p": (args.top_p, TOP_P),
                   "--top-k": (args.top_k, NON_NEGATIVE), "--max-new-tokens": (args.max_new_tokens, POSITIVE),
                   "--seed": (args.seed, SEED), "--device": (args.device, DEVICE)})


def check_db(path: str, must_exist: bool) -> None:
    """--db: an SQLite database (or, when it may be created, a writable new path)."""
    from llmtrain.config import path_problem

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--db {p}: is a directory, not a feedback database")
    if p.is_file():
        with open(p, "rb") as fh:
            head = fh.read(16)
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"--db {p}: not an SQLite database (not a feedback database written by llmtrain)")
        return
    if must_exist:
        raise ConfigError(f"--db {p}: no such database (`llmtrain feedback generate` or `feedback add-annotator` creates one)")
    problem = path_problem(p, "file")
    if problem:
        raise ConfigError(f"--db {p}: {problem}")


def check_out(flag: str, path: str | None, kind: str) -> None:
    """An output path (`kind` "file" or "directory") that can be written, or a ConfigError naming `flag`."""
    from llmtrain.config import path_problem

    problem = path_problem(path, kind) if path else None
    if problem:
        raise ConfigError(f"{flag} {path}: {problem}")


def not_utf8(argv: list[str]) -> str | None:
    """The flag or key whose value (or which itself) holds bytes that are not UTF-8: Python hands
    them over as lone surrogates, which no tokenizer, file or terminal takes. None when all are text."""
    for i, arg in enumerate(argv):
        if not has_surrogate(arg):
            continue
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            return name if not has_surrogate(name) else "an option's name"
        key, sep, _ = arg.partition("=")
        if sep and not has_surrogate(key):
            return f"'{key.strip()}'"
        if i > 0 and argv[i - 1].startswith("-") and not has_surrogate(argv[i - 1]):
            return argv[i - 1]
        return f"argument {i + 1}"
    return None
