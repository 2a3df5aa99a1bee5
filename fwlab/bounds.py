"""Bounds on a config field's value, declared with the field and checked as a run's config is
composed: ``model.hidden_size=0`` stops the command with one line naming the key, where the value
came from and the bound, before anything is written (instead of failing inside torch, or
training a network of no units). A plugin's config declares them the same way::

    @dataclass
    class MyCellConfig(CellConfig):
        slots: int = bounded(128, at_least=1)
        decay: float = bounded(0.95, at_least=0.0, at_most=1.0)
        rate: float = bounded(0.1, above=0.0)
        fraction: float = bounded(0.5, above=0.0, below=1.0)

A field whose value may be ``None`` is checked only when it is not. A cell and a datamodule also
check their config's bounds as they are built (:func:`check_bounds`), for configs made in Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fwlab.errors import ConfigError

_METADATA_KEY = "fwlab_bounds"


@dataclass(frozen=True)
class Bounds:
    """``at_least <= value``, ``above < value``, ``value <= at_most``, ``value < below`` (each
    where given)."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` ("must be at least 1, not 0"), or ``None``."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None  # None where the field allows it; a value's type is OmegaConf's to check
        holds = (
            (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
            and (self.below is None or value < self.below)
        )
        return None if holds else f"must be {self.describe()}, not {value!r}"

    def describe(self) -> str:
        """The bounds in words: "at least 0 and at most 1"."""
        named = (
            (self.at_least, "at least"),
            (self.above, "above"),
            (self.at_most, "at most"),
            (self.below, "below"),
        )
        return " and ".join(f"{words} {bound:g}" for bound, words in named if bound is not None)


def bounded(
    default: Any,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with ``default`` and the given bounds (see the module's docstring)."""
    bounds = Bounds(at_least=at_least, above=above, at_most=at_most, below=below)
    return dataclasses.field(default=default, metadata={_METADATA_KEY: bounds})


def bounds_of(field: dataclasses.Field) -> Bounds | None:
    """The bounds a field was declared with, or ``None``."""
    return field.metadata.get(_METADATA_KEY)


def out_of_bounds(schema: type, values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first of ``values`` (field name -> value) outside the bounds of its field of the
    dataclass ``schema``, as (name, problem), or ``None``."""
    for field in dataclasses.fields(schema):
        bounds = bounds_of(field)
        if bounds is not None and field.name in values:
            problem = bounds.problem(values[field.name])
            if problem is not None:
                return field.name, problem
    return None


def check_bounds(config: Any, prefix: str) -> None:
    """Raise :class:`~fwlab.errors.ConfigError` for the first field of the dataclass instance
    ``config`` outside its bounds, naming it as ``prefix`` + its name (``model.hidden_size``)."""
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    found = out_of_bounds(type(config), values)
    if found is not None:
        name, problem = found
        raise ConfigError(f"bad value for '{prefix}{name}': {problem}")
