"""What ``lightning.Trainer`` takes, read from its signature, so that ``trainer.*`` is checked
before a run starts: the arguments' names, and from their annotations the values a YAML file or
a ``key=value`` argument can give them (``trainer.max_steps=abc`` is refused there, naming the
key, instead of failing inside Lightning with a traceback after the run directory exists).
What only Lightning can judge, as a ``Trainer`` is built (an accelerator the machine lacks, an
unknown strategy, ``devices=0``), :func:`check_settings` asks it before the run directory exists.

A config's values are plain data: integers, numbers, strings, booleans, null, lists, mappings.
An annotation's other members (an ``Accelerator``, a ``timedelta``) are objects no config value
is, so they neither admit nor refuse one; an argument whose annotation names no plain member at
all is not judged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import types
import typing
from typing import Any, Literal

from fwlab.errors import ConfigError

_SCALARS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}
_PLURALS: dict[Any, str] = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


@functools.cache
def annotations() -> dict[str, Any]:
    """``lightning.Trainer``'s arguments by name, with their annotations (``Any`` where one
    cannot be read)."""
    import lightning

    parameters = inspect.signature(lightning.Trainer.__init__).parameters
    try:
        hints = typing.get_type_hints(lightning.Trainer.__init__)
    except Exception:  # an annotation this Python cannot evaluate: the names are still known
        hints = {}
    return {name: hints.get(name, Any) for name in parameters if name != "self"}


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` as ``lightning.Trainer``'s argument ``name`` by its
    annotation (for example "takes an integer, not 'abc'"); ``None`` if nothing is, or if the
    annotation cannot judge it. Interpolations (``${...}``) are left to be resolved."""
    if isinstance(value, str) and ("${" in value or value == "???"):
        return None
    plain = [member for member in _members(annotations()[name]) if _is_plain(member)]
    if not plain or any(_admits(member, value) for member in plain):
        return None
    return f"takes {_describe(plain)}, not {value!r}"


def _members(annotation: Any) -> list[Any]:
    """The members of a union (``Optional[X]`` is ``X | None``), else the annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _is_plain(member: Any) -> bool:
    """Whether a config value can be of type ``member`` (a list's or mapping's items too)."""
    if member is Any or member in _SCALARS or member in (list, dict):
        return True
    origin, args = typing.get_origin(member), typing.get_args(member)
    if origin in (list, dict):
        return all(any(_is_plain(m) for m in _members(arg)) for arg in args)
    return origin is Literal


def _admits(member: Any, value: Any) -> bool:
    origin, args = typing.get_origin(member), typing.get_args(member)
    if member is Any:
        return True
    if origin is Literal:  # by type as well: True is not the literal 1, nor "16" the literal 16
        return any(type(choice) is type(value) and choice == value for choice in args)
    if member is float:
        return type(value) in (int, float)
    if member in _SCALARS:
        return type(value) is member
    if member is list or origin is list:
        item = args[0] if args else Any
        return isinstance(value, list) and all(_admitted(item, v) for v in value)
    if member is dict or origin is dict:
        key, item = args if args else (Any, Any)
        return isinstance(value, dict) and all(
            _admitted(key, k) and _admitted(item, v) for k, v in value.items()
        )
    return False


def _admitted(annotation: Any, value: Any) -> bool:
    return any(_admits(member, value) for member in _members(annotation))


def _describe(members: list[Any]) -> str:
    """``members`` in words: "an integer or null", "one of 64, 32, '16-mixed', ... or null"."""
    words, choices = [], []
    for member in members:
        origin, args = typing.get_origin(member), typing.get_args(member)
        if origin is Literal:
            choices += [repr(choice) for choice in args]
        elif member in _SCALARS:
            words.append(_SCALARS[member])
        elif origin is list and args and args[0] in _PLURALS:
            words.append(f"a list of {_PLURALS[args[0]]}")
        else:
            words.append("a list" if member is list or origin is list else "a mapping")
    if choices:
        words.insert(0, f"one of {', '.join(choices)}")
    return " or ".join(words)


def check_settings(settings: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``lightning.Trainer`` refuses the ``trainer.*`` settings as
    it is built, naming the setting its message points at (all of them where it points at none).

    A throwaway ``Trainer`` is built from them, with no logger and quietly (it writes nothing
    as it is built; the run's own is built once the run directory exists): ~5 ms."""
    import lightning

    log = logging.getLogger("lightning.pytorch")  # "GPU available: ..." once, not twice
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        lightning.Trainer(**{**settings, "logger": False})
    except Exception as error:  # noqa: BLE001 - whatever Lightning raises for a setting
        message = " ".join(str(error).split()) or type(error).__name__
        named = _pointed_at(settings, message)
        shown = ", ".join(f"trainer.{key}={settings[key]}" for key in named)
        raise ConfigError(
            f"{shown}: lightning.Trainer refuses {'it' if len(named) == 1 else 'one of them'}: "
            f"{message} (stopped before anything was written)"
        ) from None
    finally:
        log.setLevel(level)


def _pointed_at(settings: dict[str, Any], message: str) -> list[str]:
    """The settings ``message`` points at: by ``key=`` or `` `key` `` as Lightning writes them,
    else by the key's name, else by a string value it quotes ("No supported gpu backend" for
    accelerator=gpu); all of them where nothing matches."""
    lower = message.lower()
    tiers = [
        lambda key: f"{key}=" in message or f"`{key}`" in message,
        lambda key: re.search(rf"\b{re.escape(key)}\b", lower) is not None,
        lambda key: isinstance(settings[key], str) and settings[key].lower() in lower,
    ]
    for matches in tiers:
        named = [key for key in settings if matches(key)]
        if named:
            return named
    return list(settings)
