"""Experiment configs: load ``experiments/NAME.py[:ARG]``, apply ``--config.KEY=VALUE``
overrides to the locked ConfigDict, and turn sections into plain keyword arguments.

Overrides follow the ml_collections ``config_flags`` convention with friendlier errors:
an unknown key names the closest valid keys, and a value of the wrong type names the key,
the value and the expected type.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the Python file in ``spec = "path.py[:arg]"``, locked."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(f"--config must be an existing .py file[:arg], got {spec!r}")
    module_spec = importlib.util.spec_from_file_location("_modjax_experiment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{path}:get_config must return a ConfigDict, got {type(config)}")
    config.lock()
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of a ConfigDict (sections and leaves)."""
    keys = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, key + "."))
    return keys


def _parse(key: str, raw: str, current: Any) -> Any:
    def fail():
        expected = type(current).__name__
        raise ValueError(f"--config.{key}={raw!r}: expected a value of type {expected}")

    if isinstance(current, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        fail()
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            fail()
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            fail()
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        fail()
    if current is not None and isinstance(current, tuple | list):
        if not isinstance(value, tuple | list):
            fail()
        return type(current)(value)
    if current is not None and not isinstance(value, type(current)):
        fail()
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Set dotted ``key`` of ``config`` from the string ``raw``, converted to the type of
    the current value. Unknown keys and wrong types raise ValueError."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = flat_keys(config)
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        value = _parse(key, raw, {})
        if not isinstance(value, dict):
            raise ValueError(f"--config.{key}={raw!r}: expected a dict for a config section")
        with node.unlocked():
            node[parts[-1]] = ml_collections.ConfigDict(value)
        return
    value = _parse(key, raw, current)
    with node.ignore_type():
        node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Split ``argv`` into ``--name value`` / ``--name=value`` flags and
    ``--config.KEY=VALUE`` overrides (in order)."""
    flags: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"flag --{name} needs a value")
            value = argv[i + 1]
            i += 1
        if name.startswith("config."):
            overrides.append((name[len("config.") :], value))
        else:
            flags[name] = value
        i += 1
    return flags, overrides


def to_kwargs(section: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """A config section as plain keyword arguments (nested sections become dicts, lists
    become tuples so frozen dataclasses stay hashable)."""
    if isinstance(section, ml_collections.ConfigDict):
        section = section.to_dict()

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return tuple(plain(x) for x in v)
        return v

    return {k: plain(v) for k, v in section.items()}


__all__ = ["apply_override", "flat_keys", "load_config", "parse_overrides", "to_kwargs"]
