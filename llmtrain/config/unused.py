"""Fields a stage does not read are refused, not silently ignored (issue #16, Build 5).

A config class lists them in its `UNUSED` table: each `Unused` names a dotted key, why the
stage does without it, and, for a field read only under some setting, `when` (the setting
that makes it unused, as text and as a test). At load, a value other than the class's own
default is a one-line error naming the key, e.g.

    'run.grad_accum' is not used by dpo (...); leave it at 1

The texts may hold `{p}`, the section's dotted prefix (`ppo.` inside a pipeline config), so
that keys they name read as they are typed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Unused:
    key: str  # dotted, relative to the class that lists it ("run.batch_size")
    why: str  # what the stage uses instead, or why the value would change nothing
    when: str = ""  # e.g. "with {p}lora.enabled"; empty: never read
    applies: Callable[[Any], bool] | None = None  # the test of `when` on the loaded config


def dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def unused_problems(obj: Any, p: str) -> list[tuple[str, str]]:
    """(key, problem) for each field of `obj`'s UNUSED table set to a value other than its
    default while unused; `p` is `obj`'s dotted prefix. The stage named is `obj.stage`."""
    table = getattr(type(obj), "UNUSED", ())
    if not table:
        return []
    defaults, out = type(obj)(), []
    by = f" by {obj.stage}" if getattr(obj, "stage", "") else ""
    for u in table:
        value, default = dotted(obj, u.key), dotted(defaults, u.key)
        if value != default and (u.applies is None or u.applies(obj)):
            when = " " + u.when.format(p=p) if u.when else ""
            out.append((u.key, f"is not used{by}{when} ({u.why.format(p=p)}); leave it at {default!r}"))
    return out
