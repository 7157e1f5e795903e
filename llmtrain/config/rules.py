"""Value rules: what one config field may hold, declared next to the field.

`check(default, RULE)` puts a rule in the field's metadata and the loader
(llmtrain.config.loading) applies it when a config is loaded, so a bad value is a one-line
error naming the key and where it came from (the YAML file or the command line) before
anything runs. Rules that relate two fields are each class's `_checks`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import field
from pathlib import Path

class Rule:
    """A named condition on one value: `problem(value)` is None when the value is allowed,
    else what it must be (e.g. "must be > 0")."""

    def __init__(self, ok, text: str):
        self.ok, self.text = ok, text

    def problem(self, value) -> str | None:
        return None if self.ok(value) else f"must be {self.text}"

    def __or__(self, note: str) -> "Rule":  # RULE | "0: only at the end" adds what 0 means
        return Rule(self.ok, f"{self.text} ({note})")


POSITIVE = Rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
BETA = Rule(lambda v: 0 <= v < 1, ">= 0 and < 1")
TOP_P = Rule(lambda v: 0 < v <= 1, "> 0 and <= 1")
FRACTION = Rule(lambda v: 0 <= v <= 1, "between 0 and 1")
TEMPERATURE = Rule(lambda v: v >= 0, ">= 0 (0: greedy)")
HELD_OUT_EVERY = Rule(lambda v: v >= 2, ">= 2 (every Nth item is held out)")
SEED = Rule(lambda v: 0 <= v < 2**63, ">= 0 and < 2**63")  # torch and numpy take a signed 64-bit seed
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))  # far more threads than cores only slows; 100000 crashes torch
THREADS = Rule(lambda v: 0 <= v <= MAX_THREADS, f">= 0 and <= {MAX_THREADS} (0: torch's default)")


def at_least(n: int) -> Rule:
    return Rule(lambda v: v >= n, f">= {n}")


class _Device(Rule):
    def __init__(self):
        super().__init__(None, "a device of this machine")

    def problem(self, value) -> str | None:
        # lazy: dist imports torch (about 2 s) to ask which devices exist; configs are also read
        # by commands that never run a model (tests/unit/test_layers.py LAZY_LLMTRAIN)
        from llmtrain.dist import device_problem

        return device_problem(value)


class _Writable(Rule):
    """A path that can be written: an existing directory (or file) there, or a missing one whose
    nearest existing parent is a directory this process can create files in. Probing creates
    and removes one temporary file, so a failed check leaves nothing behind."""

    def __init__(self, kind: str, required: bool = False):
        super().__init__(None, f"a writable {kind} path")
        self.kind, self.required = kind, required

    def problem(self, value) -> str | None:
        if not value.strip():  # "" (where allowed) means "none" or "a default"; blanks never name a path
            return f"must name a {self.kind}, not be empty" if self.required or value else None
        return path_problem(value, self.kind)


DEVICE = _Device()
WRITABLE_DIR = _Writable("directory")
WRITABLE_FILE = _Writable("file")
OUTPUT_DIR = _Writable("directory", required=True)  # an output folder that must be given (never the cwd by accident)
OUTPUT_FILE = _Writable("file", required=True)


def path_problem(path: str | Path, kind: str = "directory") -> str | None:
    """Why `path` cannot be written as a `kind` ("directory" or "file"), or None."""
    p = Path(path)
    if p.exists():
        if kind == "directory" and not p.is_dir():
            return "names a file that exists, not a directory"
        if kind == "file" and p.is_dir():
            return "names a directory, not a file"
    parent = p if kind == "directory" and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmtrain-probe-", dir=parent)
    except OSError as e:
        return f"is not writable (cannot create files in {parent}: {e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def check(default, rule: Rule):
    """A dataclass field with `default` whose values must pass `rule` (checked at load)."""
    return field(default=default, metadata={"check": rule})

