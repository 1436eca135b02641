"""YAML files + dotted command-line overrides → a validated :class:`Config`.

A config file may start with ``extends: other.yaml`` (a path relative to the file) to reuse another
config and change only some keys, so shared pieces are referenced rather than copied. Sections merge key
by key; the mappings named in :data:`REPLACED_ON_EXTEND` are values, not sections: a child's copy
replaces its parent's whole (a child's ``data.labels: {background: 0, tumour: 1}`` must not inherit the
parent's ``lesion: 1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from pipeline.config.schema import Config
from pipeline.errors import ConfigError

_NONE_TYPE = type(None)

# Dotted keys whose mapping a child config replaces instead of merging into its parent's.
REPLACED_ON_EXTEND = frozenset({"data.labels"})


def load_config(path: Union[str, Path, None] = None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``key.sub=value`` overrides, validate."""
    raw: dict = _read_yaml_chain(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def override_config(config: Config, overrides: Iterable[str], allowed_prefix: str = "") -> Config:
    """``config`` with ``key.sub=value`` overrides applied and validated; keys must start with
    ``allowed_prefix`` (e.g. ``input.`` where only the input rules may change)."""
    raw = config_to_dict(config)
    for item in overrides:
        key, value = _parse_override(item)
        if not key.startswith(allowed_prefix):
            raise ConfigError(f"override '{item}' cannot be changed here: expected keys starting with "
                              f"'{allowed_prefix}' (e.g. {allowed_prefix}modalities=[CT])")
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from plain nested dicts (YAML, or a checkpoint's copy)."""
    config = _build(Config, raw, prefix="")
    _validate(config)
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


# --- reading ---------------------------------------------------------------------------------------


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'. Pass a YAML file such as configs/demo.yaml")
    if path.resolve() in seen:
        raise ConfigError(f"config '{path}' extends itself through {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config '{path}' is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path}' must hold a mapping of sections, found {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_yaml_chain(path.parent / parent, seen + (path.resolve(),))
    return _merge(base, data)


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dotted not in REPLACED_ON_EXTEND:
            out[key] = _merge(out[key], value, dotted + ".")
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(
            f"override {item!r} is not of the form key.subkey=value (e.g. train.epochs=5 model.features=16)"
        )
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# --- building typed objects -----------------------------------------------------------------------


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, found {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown config key '{prefix}{key}'.{hint} Allowed keys in "
            f"'{prefix.rstrip('.') or '<root>'}': {', '.join(names)}"
        )
    kwargs = {name: _coerce(f"{prefix}{name}", hints[name], raw[name]) for name in names if name in raw}
    return cls(**kwargs)


def _coerce(key: str, tp, value):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Union:
        if value is None and _NONE_TYPE in args:
            return None
        inner = [a for a in args if a is not _NONE_TYPE]
        return _coerce(key, inner[0], value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected a list")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected a mapping")
        return {_coerce(key, args[0], k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' has invalid value {value!r}: expected a string")
        return value
    return value


def _validate(obj) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value)
    check = getattr(obj, "_check", None)
    if check is not None:
        check()
