"""A generic YAML config loader: a dataclass schema ← its defaults ← a YAML file ← ``section.key=value`` overrides.

It knows no recipe: it coerces values to the schema's types (YAML reads ``1e-4`` as a string, lists as lists), names
an unknown key with the closest valid one, and reports every problem as one :class:`ConfigError` line. The recipe's
schema and its checks live in :mod:`kasa_ds.training.config`; the Megatron recipe and the tools read theirs here too.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
from typing import Any, Iterable, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad configuration; its message is one line naming the key and the fix."""


def need(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``: the one-line form of every check."""
    if not ok:
        raise ConfigError(message)


def load_config(schema, path: Optional[str], overrides: Iterable[str] = ()):
    """An instance of the dataclass ``schema`` from its defaults ← YAML file ← ``section.key=value`` overrides.

    Unknown keys (with the closest valid one) and wrong types are one :class:`ConfigError` line each."""
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return _build(schema, raw, "", schema)


def read_yaml(path: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file, invalid YAML or a non-mapping is a ConfigError."""
    need(os.path.isfile(path), f"--config {path}: file not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    need(isinstance(raw, dict), f"--config {path}: expected a mapping of sections at the top level")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` (the value read as YAML) in the nested mapping ``raw``."""
    key, sep, value = item.partition("=")
    need(bool(sep and key), f"override {item!r}: write overrides as section.key=value, e.g. train.lr=3e-4")
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        need(isinstance(node, dict), f"override {item!r}: {p} is not a section")
    node[leaf] = yaml.safe_load(value) if value else None


def resolve_path(path: Optional[str], base_dirs: Iterable[os.PathLike | str] = ()) -> Optional[str]:
    """``~`` expanded; a relative path is taken from the working directory if it exists there, else from the first
    of ``base_dirs`` where it exists (an entry point passes its checkout), else returned as given."""
    if path is None or ":" in path.split("/")[0]:  # None, or a scheme such as embedded:
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for base in base_dirs:
        candidate = os.path.join(base, path)
        if os.path.exists(candidate):
            return candidate
    return path


def dump(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def _build(cls, raw: Any, where: str, root=None):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}{_suggestion(key, names, where, root)}")
        kwargs[key] = _coerce(hints[key], value, full, root)
    return cls(**kwargs)


def _suggestion(key: str, names: list[str], where: str, root) -> str:
    """The same key in another section (train.gradient_checkpointing → model.gradient_checkpointing) before a
    near spelling in this one."""
    elsewhere = [f"{section}.{key}" for section, tp in _sections(root) if key in {f.name for f in dataclasses.fields(tp)}]
    if elsewhere:
        return f"; it belongs to another section: did you mean {elsewhere[0]}?"
    close = difflib.get_close_matches(key, names, n=1)
    return f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"


def _sections(root) -> list[tuple[str, type]]:
    if root is None:
        return []
    hints = get_type_hints(root)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(root) if dataclasses.is_dataclass(hints[f.name])]


def _coerce(tp, value: Any, key: str, root=None):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".", root)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        allowed = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{key}={value!r}: expected {allowed}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if (tp is list or get_origin(tp) in (list, collections.abc.Sequence)) and isinstance(value, (list, tuple)):
        return list(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}={value!r}: expected {getattr(tp, '__name__', tp)}")


