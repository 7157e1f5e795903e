"""Reading YAML safely: a key given twice and alias bombs refused, a file that is not a YAML
mapping named in one line."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from llmtrain.errors import ConfigError
from llmtrain.files import regular_file

MAX_YAML_VALUES = 100_000  # a config is small; aliases that expand past this are a "billion laughs"


class _Refused(Exception):
    """A YAML document refused by `safe_load` (duplicate key, too big once aliases expand)."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last
    silently) and counts the values aliases expand to."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise _Refused(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice (first on "
                                   f"line {seen[key]}); YAML would keep only the last")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any) -> int:
    """How many values `value` holds once every alias is expanded (shared lists and dicts counted
    each time they occur), computed without expanding; stops counting past MAX_YAML_VALUES."""
    memo: dict[int, int] = {}

    def size(v) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        if id(v) not in memo:
            memo[id(v)] = 1  # a cycle (an alias inside itself) counts once
            items = list(v.values()) if isinstance(v, dict) else v
            memo[id(v)] = min(1 + sum(size(x) for x in items), MAX_YAML_VALUES + 1)
        return memo[id(v)]

    return size(value)


def safe_load(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys and alias bombs (raises _Refused)."""
    loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    if _expanded_size(loaded) > MAX_YAML_VALUES:
        raise _Refused(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
    return loaded


def read_yaml(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty: {}), or a one-line ConfigError."""
    p = regular_file(path, "a YAML config file", "config file", ConfigError)
    try:
        loaded = safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    except _Refused as e:
        if str(e).startswith("line"):
            raise ConfigError(f"{p} {e}") from None
        raise ConfigError(f"{p}: not a usable YAML config ({e})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a usable YAML config (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys to values, not {_kind(loaded)}")
    return loaded


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(
        type(value), type(value).__name__)

