"""Loading a config: a YAML file, then `key=value` overrides on top (dotted for nested
fields, e.g. ``optim.lr=3e-4``), every key checked against the dataclass fields and every
value against the field's type and rule. An error is one line naming the key and where its
value came from: the YAML file, or the command line."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtrain.config.rules import _Writable
from llmtrain.config.sections import OptimConfig, RunConfig
from llmtrain.config.unused import dotted, unused_problems
from llmtrain.config.yamlfile import _kind, _Refused, read_yaml, safe_load
from llmtrain.errors import ConfigError

COMMAND_LINE = "command line"


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build `cls` from an optional YAML file and `key=value` overrides, checking every key and
    every value. An error names the key and where its value came from: the YAML file, or the
    command line for an override."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    cli: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{COMMAND_LINE}: {item!r} is not of the form key=value")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{COMMAND_LINE}: '{key}': the value {raw!r} is not valid YAML "
                              f"({getattr(e, 'problem', None) or type(e).__name__})") from None
        except _Refused as e:
            raise ConfigError(f"{COMMAND_LINE}: '{key}': the value {raw!r} is not usable YAML ({e})") from None
        set_dotted(data, key, value, source=str(path) if path else COMMAND_LINE, origins=cli)
        cli.add(key)
    return from_dict(cls, data, source=str(path) if path else COMMAND_LINE, origins=cli)


def set_dotted(data: dict, key: str, value: Any, source: str = COMMAND_LINE, origins=None) -> None:
    """Set dotted `key` of the override `key=value`. When a section on the way holds a value
    that is not a mapping, the error blames where that value came from (`source`, the YAML
    file, unless the command line set it: `origins`)."""
    node = data
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{COMMAND_LINE}: '{key}' is not a dotted key (e.g. optim.lr)")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            section = ".".join(parts[:i + 1])
            where = _origin(section, source, origins)
            if where == COMMAND_LINE:
                raise ConfigError(f"{COMMAND_LINE}: '{key}': {section} is not a section")
            raise ConfigError(f"{where}: '{section}' must be a mapping (a section), got {_kind(nxt)}; "
                              f"so '{key}' given on the command line cannot be set")
        node = nxt
    node[parts[-1]] = value


def _origin(key: str, source: str, origins) -> str:
    """Where the value of dotted `key` came from: the command line when it, or a section
    holding it, was given there; else `source` (the YAML file)."""
    if origins:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in origins:
                return COMMAND_LINE
    return source


def from_dict(cls: type, data: dict, source: str = "config", prefix: str = "", origins=None) -> Any:
    """`cls` from a dict, checking keys, types and each field's rule. `origins` holds the dotted
    keys given on the command line (their errors say so); the rest are blamed on `source`."""
    if not isinstance(data, dict):
        key = prefix.rstrip(".")
        raise ConfigError(f"{_origin(key, source, origins)}: '{key or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            full = f"{prefix}{key}"
            raise ConfigError(f"{_origin(full, source, origins)}: unknown key '{full}' for {cls.__name__}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            # A section given in part keeps this class's own defaults for the rest (e.g. the
            # reward stage's run.max_steps=200 when only run.log_every is set), not the
            # defaults of the section's class.
            if (dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict)
                    and f.default_factory is not dataclasses.MISSING):
                value = {**to_dict(f.default_factory()), **value}
            key = f"{prefix}{f.name}"
            kwargs[f.name] = value = _coerce(hints[f.name], value, key, source, origins)
            rule = f.metadata.get("check")
            if rule is not None:
                problem = rule.problem(value)
                if problem:
                    raise ConfigError(f"{_origin(key, source, origins)}: '{key}' {problem}, got {value!r}")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults are checked too (a stage's own default may not fit)
        rule = f.metadata.get("check")
        if f.name not in data and rule is not None and not isinstance(rule, _Writable) and rule.problem(getattr(obj, f.name)):
            key = f"{prefix}{f.name}"
            raise ConfigError(f"{source}: '{key}' {rule.problem(getattr(obj, f.name))}, got {getattr(obj, f.name)!r}")
    checks = getattr(obj, "_checks", None)
    for key, problem in [*(checks(prefix) if checks is not None else []), *unused_problems(obj, prefix)]:
        value = dotted(obj, key)
        key = f"{prefix}{key}"
        raise ConfigError(f"{_origin(key, source, origins)}: '{key}' {problem}, got {value!r}")
    _check_warmup(obj, data, source, prefix, origins)
    return obj


def _check_warmup(obj: Any, data: dict, source: str, prefix: str, origins) -> None:
    """A stage's optim.warmup_steps, when given, must not exceed run.max_steps (> 0): the learning
    rate would never reach optim.lr (1e20 warm-up steps trained at lr 1e-23). A stage's own
    default warm-up, and a YAML file's warm-up when run.max_steps is shortened on the command
    line (a quick try of a configured run), are left alone."""
    optim, run = getattr(obj, "optim", None), getattr(obj, "run", None)
    if not (isinstance(optim, OptimConfig) and isinstance(run, RunConfig)):
        return
    given = data.get("optim")
    if not (isinstance(given, dict) and "warmup_steps" in given):
        return
    key = f"{prefix}optim.warmup_steps"
    if (_origin(key, source, origins) != COMMAND_LINE
            and _origin(f"{prefix}run.max_steps", source, origins) == COMMAND_LINE):
        return  # a configured run shortened on the command line (e.g. `demo pretrain.run.max_steps=1`)
    if run.max_steps > 0 and optim.warmup_steps > run.max_steps:
        raise ConfigError(f"{_origin(key, source, origins)}: '{key}' must be <= {prefix}run.max_steps="
                          f"{run.max_steps} (the learning rate would never reach {prefix}optim.lr), "
                          f"got {optim.warmup_steps!r}")


def _coerce(tp: Any, value: Any, key: str, source: str, origins=None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = _origin(key, source, origins)
    bad = ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {_short(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key + ".", origins)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source, origins)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if not isinstance(value, typing.Hashable) or value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(str, args))}, got {_short(value)}")
        return value
    if origin is dict:  # a mapping, e.g. data.columns {our field: the data's column}
        if not isinstance(value, dict):
            raise bad
        return {_coerce(args[0], k, f"{key} (a key)", source, origins): _coerce(args[1], v, f"{key}.{k}", source, origins)
                for k, v in value.items()} if args else dict(value)
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(args[0], v, f"{key}[{i}]", source, origins) for i, v in enumerate(value)] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {_short(value)}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _short(value: Any) -> str:
    """repr of a value, cut to one short line (a value may be a whole nested YAML document)."""
    r = repr(value).replace("\n", " ")
    return r if len(r) <= 80 else r[:77] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k).removeprefix('a ')} to {_type_name(v).removeprefix('a ')}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
