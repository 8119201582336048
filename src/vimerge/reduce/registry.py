"""The registry of token-reduction methods and the one string that describes a reduction.

A method is a dataclass registered with :func:`register_method`; its fields are its options
(checked in its ``__post_init__``). A *spec* names a method and its options in one string,
used everywhere a reduction is written down: ``--reduce`` and ``--sweep`` on the command line,
the demo's rows, the re-training configuration and the metadata saved with re-trained weights::

    "none"
    "rmeeto:r=11,interval=2"
    "rmeeto:ratio=0.28,ordered=false"
    "stm:final_ratio=0.2,hsp=false"
    "rmeeto:r=[0,4,4,4,4,4,4,4]"        # a list: one r per block

Values are ints, floats, ``true``/``false``, ``none``, bracketed lists or bare strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

NONE = "none"

METHODS: dict[str, type] = {}
"""Registered methods: name -> reducer class (a dataclass)."""

T = TypeVar("T", bound=type)


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make ``vimerge.apply(model, name, **options)`` build ``cls(**options)``.

    The class must be a dataclass whose init fields are the method's options; it gets
    ``cls.name = name``.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name) or name == NONE:
        raise ValueError(f"invalid method name {name!r}: lower-case letters, digits, '_' or '-', not 'none'")

    def decorate(cls: T) -> T:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_method({name!r}) needs a dataclass, got {cls.__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls
    return decorate


def list_methods() -> list[str]:
    """Registered method names, sorted ("none" not included)."""
    return sorted(METHODS)


def option(default: Any = None, help: str = "", *, flag: str | None = None, action: str | None = None,
           choices: tuple | None = None, cli: bool = True) -> Any:
    """A method option: a dataclass field with what the command line needs to offer it.

    Args:
        default: the default value.
        help: one line for ``--help``.
        flag: the command-line flag (default ``--<name with - for _>``).
        action: "store_true" / "store_false" for boolean flags (default: "store_true" for a
            field whose default is False; other booleans need ``flag`` and ``action``).
        choices: allowed values (also offered by the command line).
        cli: False keeps the option out of the command-line shorthands (it stays settable
            through a spec).
    """
    metadata = {"help": help, "flag": flag, "action": action, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def options_of(method: str | type) -> list[dataclasses.Field]:
    """The option fields of a registered method (init fields not starting with ``_``)."""
    cls = METHODS[method] if isinstance(method, str) else method
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _check_method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown reduction method {name!r}; available: {', '.join([NONE, *list_methods()])}")
    return METHODS[name]


# ------------------------------------------------------------------------------------ specs


def _split(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_value(text: str) -> Any:
    """``"4"`` -> 4, ``"0.28"`` -> 0.28, ``"true"`` -> True, ``"none"`` -> None,
    ``"[1,2]"`` -> [1, 2]; anything else stays a string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(v) for v in _split(inner, ",")] if inner else []
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"rmeeto:r=11,interval=2"`` -> ``("rmeeto", {"r": 11, "interval": 2})``.

    A bare number is the ratio: ``"rmeeto:0.28"`` -> ``("rmeeto", {"ratio": 0.28})``.
    Raises ValueError naming the problem: an unknown method, an option the method does not
    take (with the ones it takes), or a malformed item.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty reduction spec; e.g. \"rmeeto:r=11\" or \"none\"")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name == NONE:
        if rest.strip():
            raise ValueError(f"reduction spec {text!r}: 'none' takes no options")
        return NONE, {}
    cls = _check_method(name)
    known = {f.name for f in options_of(cls)}
    options: dict[str, Any] = {}
    for item in _split(rest, ",") if rest.strip() else []:
        item = item.strip()
        if "=" not in item:
            value = parse_value(item)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "ratio" not in options:
                options["ratio"] = float(value)
                continue
            raise ValueError(f"reduction spec {text!r}: {item!r} is not KEY=VALUE; e.g. {name}:ratio=0.28")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in known:
            raise ValueError(f"reduction spec {text!r}: {name} has no option {key!r}; its options: "
                             f"{', '.join(sorted(known))}")
        options[key] = parse_value(value)
    return name, options


def format_spec(name: str, options: dict[str, Any] | None = None) -> str:
    """The spec string of a method and its options (``None`` values left out); round-trips
    through :func:`parse_spec`."""
    if name == NONE:
        return NONE
    items = [f"{k}={format_value(v)}" for k, v in (options or {}).items() if v is not None]
    return name + (":" + ",".join(items) if items else "")


def spec_of(reducer: Any) -> str:
    """The spec of an installed reducer: its method and the options that differ from the
    defaults (``"none"`` for None)."""
    if reducer is None:
        return NONE
    name = getattr(reducer, "name", None)
    if name not in METHODS or not isinstance(reducer, METHODS[name]):
        raise ValueError(f"{type(reducer).__name__} is not a registered method; it has no spec")
    changed = {}
    for f in options_of(type(reducer)):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = getattr(reducer, f.name)
        if value != default:
            changed[f.name] = list(value) if isinstance(value, tuple) else value
    return format_spec(name, changed)


def stored_spec(entry: Any) -> str:
    """The spec of a reduction recorded with weights or in a configuration: a spec string, None
    (``"none"``), or the ``{"method", "options"}`` dict written before specs existed, in which
    STM's old ``ratio`` (the share of tokens gone after the last block) is today's
    ``final_ratio``."""
    if entry is None or isinstance(entry, str):
        return format_spec(*parse_spec(entry)) if entry else NONE
    if not isinstance(entry, dict):
        raise ValueError(f"a recorded reduction is a spec string or a {{'method', 'options'}} dict, got {entry!r}")
    method, options = entry.get("method") or NONE, dict(entry.get("options") or {})
    if method == "stm" and "ratio" in options and "final_ratio" not in options:
        options["final_ratio"] = options.pop("ratio")
    return format_spec(method, options)


def build(method: str, **options: Any):
    """A reducer of a registered method (``None`` for "none"); errors name the bad option."""
    if method == NONE:
        if options:
            raise ValueError(f"'none' takes no options, got {', '.join(options)}")
        return None
    if ":" in method:
        name, parsed = parse_spec(method)
        return build(name, **{**parsed, **options})
    cls = _check_method(method)
    known = {f.name for f in options_of(cls)}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"{method} has no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(sorted(known))}")
    for f in options_of(cls):
        if f.name in options:
            options[f.name] = _typed(method, f, options[f.name])
    return cls(**options)


def _typed(method: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` checked against the option's annotation (ints stay ints, a float option takes
    an int); ValueError naming the option otherwise."""
    kind = str(f.type).replace(" ", "")
    allowed = set(kind.split("|"))
    name = {type(None): "None", bool: "bool", int: "int", float: "float", str: "str"}.get(type(value))
    if name in allowed or "Any" in allowed:
        return value
    if name == "int" and "float" in allowed:
        return float(value)
    if (isinstance(value, (list, tuple)) and "list[int]" in allowed
            and all(type(v) is int for v in value)):
        return list(value)
    raise ValueError(f"{method} option {f.name} takes {kind.replace('|', ' or ')}, got {value!r}")
