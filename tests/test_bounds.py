"""Bounds on config fields (fwlab/bounds.py): every bounded field of every registered plugin,
and of fwlab's own sections, refuses a value just outside a bound, naming the key and where the
value came from, and takes the bound itself."""

from __future__ import annotations

import dataclasses

import pytest

from fwlab.bounds import Bounds, bounds_of
from fwlab.config import GENERIC_MODEL, compose, data_schema, model_schema
from fwlab.errors import ConfigError
from fwlab.optim import OptimConfig
from fwlab.registry import Registry

REGISTRY = Registry()
MODELS = REGISTRY.names("cell") + [m for m in REGISTRY.names("model") if m != GENERIC_MODEL]


def bounded_fields() -> list[tuple[str, str, str, dataclasses.Field, Bounds]]:
    """(model, data, section, field, bounds) for every bounded field of every schema."""
    found = []
    for model in MODELS:
        for f in dataclasses.fields(model_schema(REGISTRY, model)):
            if (bounds := bounds_of(f)) is not None:
                found.append((model, "retrieval", "model", f, bounds))
    for data in REGISTRY.names("data"):
        for f in dataclasses.fields(data_schema(REGISTRY, data)):
            if (bounds := bounds_of(f)) is not None:
                found.append(("lstm", data, "data", f, bounds))
    for f in dataclasses.fields(OptimConfig):
        if (bounds := bounds_of(f)) is not None:
            found.append(("lstm", "retrieval", "optim", f, bounds))
    return found


FIELDS = bounded_fields()


def outside_and_on(bounds: Bounds, is_int: bool) -> list[tuple[float, float]]:
    """(a value just outside, the bound itself or the nearest value inside) per bound."""
    step = 1 if is_int else 0.5
    cases = []
    if bounds.at_least is not None:
        cases.append((bounds.at_least - step, bounds.at_least))
    if bounds.above is not None:
        cases.append((bounds.above, bounds.above + (1 if is_int else 1e-3)))
    if bounds.at_most is not None:
        cases.append((bounds.at_most + step, bounds.at_most))
    if bounds.below is not None:
        cases.append((bounds.below, bounds.below - (1 if is_int else 1e-3)))
    return cases


def test_every_kind_of_config_has_bounded_fields_whose_defaults_hold():
    assert {section for _, _, section, _, _ in FIELDS} == {"model", "data", "optim"}
    for _, _, _, f, bounds in FIELDS:
        assert bounds.problem(f.default) is None, f.name


@pytest.mark.parametrize(
    ("model", "data", "section", "field", "bounds"),
    FIELDS,
    ids=[f"{m}-{d}-{s}.{f.name}" for m, d, s, f, _ in FIELDS],
)
def test_a_value_outside_a_fields_bounds_names_the_key_and_the_bound(
    model, data, section, field, bounds
):
    key = f"{section}.{field.name}"
    is_int = isinstance(field.default, int)
    # RMSprop has every optim.* option (momentum, rmsprop_decay); Adam, the default, refuses them
    chosen = ["optim.name=rmsprop"] if section == "optim" else []
    for outside, inside in outside_and_on(bounds, is_int):
        value = int(outside) if is_int else float(outside)
        with pytest.raises(ConfigError) as error:
            compose(REGISTRY, model=model, data=data, overrides=[*chosen, f"{key}={value}"])
        assert str(error.value) == (
            f"bad value for '{key}' (from the command line): must be {bounds.describe()}, "
            f"not {value!r}"
        )
        overrides = [*chosen, f"{key}={inside}"]
        config = compose(REGISTRY, model=model, data=data, overrides=overrides)
        assert config[section][field.name] == inside


def test_a_bound_names_the_file_a_value_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 0\n")
    with pytest.raises(
        ConfigError, match=rf"'model.hidden_size' \(from {path}\): must be at least"
    ):
        compose(REGISTRY, model="fast_weights", data="retrieval", config_files=[path])


def test_an_interpolated_value_is_checked_as_resolved():
    with pytest.raises(ConfigError, match="'model.hidden_size'.*not 0"):
        compose(
            REGISTRY,
            model="lstm",
            data="retrieval",
            overrides=["seed=0", "model.hidden_size=${seed}"],
        )
    config = compose(
        REGISTRY, model="lstm", data="retrieval", overrides=["model.hidden_size=${seed}"]
    )
    assert config.model.hidden_size == config.seed


def test_bounds_describe_themselves():
    assert Bounds(at_least=1).problem(0) == "must be at least 1, not 0"
    assert Bounds(above=0.0, at_most=1.0).problem(1.5) == "must be above 0 and at most 1, not 1.5"
    assert Bounds(above=0.0, below=1.0).problem(1.0) == "must be above 0 and below 1, not 1.0"
    assert Bounds(at_least=0.0).problem(None) is None  # a field that may be None


CELL_FIELDS = [
    (cell, f, bounds)
    for cell in REGISTRY.names("cell")
    for f in dataclasses.fields(REGISTRY.get("cell", cell).Config)
    if (bounds := bounds_of(f)) is not None
]


@pytest.mark.parametrize(
    ("cell", "field", "bounds"), CELL_FIELDS, ids=[f"{c}-{f.name}" for c, f, _ in CELL_FIELDS]
)
def test_a_cell_built_in_python_from_a_config_outside_its_bounds_is_refused(cell, field, bounds):
    """The same bounds for a config made in Python, where no composing checked it."""
    cell_class = REGISTRY.get("cell", cell)
    is_int = isinstance(field.default, int)
    for outside, _ in outside_and_on(bounds, is_int):
        value = int(outside) if is_int else float(outside)
        config = cell_class.Config(**{field.name: value})
        with pytest.raises(ConfigError, match=rf"'model\.{field.name}': must be"):
            cell_class(3, config)
