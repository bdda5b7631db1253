"""Typed configs from YAML files and ``--section.key value`` overrides: a config is a dataclass of section
dataclasses; every value is coerced to its field's annotated type (PyYAML reads ``6e-4`` as a string, so
numbers are parsed here rather than trusted to YAML) and every key is checked, so an error names the key,
the value and what is allowed. Free-form mappings accept any key; their numeric-looking strings become
numbers."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from bigbatch import atomic
from bigbatch.errors import ConfigError


def _numeric(value: Any) -> Any:
    """'6e-4' -> 0.0006, '3' -> 3, nested containers recursively; other values unchanged."""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return value
    if isinstance(value, list):
        return [_numeric(v) for v in value]
    if isinstance(value, dict):
        return {k: _numeric(v) for k, v in value.items()}
    return value


def _yaml_value(where: str, text: str) -> Any:
    """``text`` (a command-line value) read as YAML, or a ConfigError naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {text!r} is not valid YAML ({problem}); quote the value and close "
                          "every bracket") from None


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        first_error = None
        for arg in args[:-1]:  # the first type that takes the value
            try:
                return _coerce(where, arg, value)
            except ConfigError as exc:
                first_error = first_error or exc
        if first_error and isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
            raise first_error  # a list or mapping that does not parse: say why, not "not allowed"
        return _coerce(where, args[-1], value)
    if value is None:
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # CLI: "8,16" or "[8, 16]"
            parsed = _yaml_value(where, value)
            value = parsed if isinstance(parsed, list) else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = _yaml_value(where, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _numeric(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: {value!r} is not an integer")
        return int(as_float) if not isinstance(value, int) else value
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_key(cfg, path: list[str], value: Any, source: str, free_form: set = frozenset()) -> None:
    """Set ``cfg.<path>`` = ``value`` (``cfg``: a dataclass of section dataclasses), coerced to the field's
    type, with every key along the path checked; ``(section, key)`` pairs in ``free_form`` are mappings
    that take any key. ``source`` names where the value came from in errors."""
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    dotted = ".".join(path)
    if path[0] not in sections:
        raise ConfigError(f"{source}: unknown section {path[0]!r} (in {dotted!r}); "
                          f"valid sections are {sorted(sections)}")
    section = getattr(cfg, path[0])
    hints = _section_types(type(section))
    if len(path) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted!r} is a section; give a mapping or "
                              f"{dotted}.<key>, keys are {sorted(hints)}")
        for key, sub in value.items():
            apply_key(cfg, path + [str(key)], sub, source, free_form)
        return
    key = path[1]
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {dotted!r}; valid keys in {path[0]!r} are "
                          f"{sorted(hints)}")
    if (path[0], key) in free_form:
        current = getattr(section, key)
        if len(path) == 2:
            setattr(section, key, _coerce(dotted, dict, value))
        else:  # --optim.hparams.lr 1e-3 sets one entry of the mapping
            node = current
            for part in path[2:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source}: {dotted!r} goes through a non-mapping value")
            node[path[-1]] = _numeric(_yaml_value(dotted, value) if isinstance(value, str) else value)
        return
    if len(path) > 2:
        raise ConfigError(f"{source}: {dotted!r} is too deep; {path[0]}.{key} is a plain value")
    setattr(section, key, _coerce(dotted, hints[key], value))


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``["--model.hidden_size", "64", "--optim.hparams.lr=1e-3"]`` -> [(key, value), ...]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE or --section.key=VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg!r}: missing value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def dump_yaml(data: dict, path: str | os.PathLike) -> None:
    """Write YAML atomically."""
    atomic.write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
