"""Composing a run's configuration: typed schemas, YAML groups and command-line overrides.

A run's config is one OmegaConf tree with the top-level keys of :class:`RunConfig`. Its schema is
typed: ``model.*`` comes from the model's (and, for a cell, the generic model's and the cell's)
config dataclasses, ``data.*`` from the datamodule's, ``optim.*`` and ``logger.*`` from fwlab's;
``trainer.*`` is passed to Lightning's ``Trainer`` and checked against its arguments. An unknown
or mistyped key is an error naming the key, where it came from and the closest valid key.

Values are merged in this order, later winning:

1. the schema's defaults (the dataclasses);
2. group files under ``configs/``: ``trainer/<t>.yaml``, ``logger/<l>.yaml``,
   ``model/<model>.yaml`` and ``data/<data>.yaml`` if they exist, ``experiment/<e>.yaml``;
   each is a fragment of the whole tree (so ``data/retrieval.yaml`` may set ``trainer.*``);
3. ``--config FILE`` files;
4. ``key=value`` arguments. ``group=name`` (``logger=csv``, ``experiment=...``) selects a group
   file instead; ``model=`` and ``data=`` are the same as ``--model`` and ``--data``.

The choices of groups come from ``configs/config.yaml``'s ``defaults:``, then an experiment's
``defaults:``, then the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fwlab import trainer_arguments
from fwlab.bounds import out_of_bounds
from fwlab.errors import ConfigError
from fwlab.optim import OptimConfig, check_optim_config
from fwlab.published import PublishedResult, check_entries, check_where_keys
from fwlab.registry import Registry

GROUPS = ("model", "data", "trainer", "logger", "experiment")
GENERIC_MODEL = "sequence"  # the registered model that wraps any cell
# Trainer arguments fwlab sets itself, with what to use instead.
RESERVED_TRAINER_KEYS = {
    "logger": "use logger=wandb|csv|none",
    "callbacks": "fwlab adds checkpointing; write a plugin model to add callbacks",
    "default_root_dir": "use output_dir=...",
}


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | csv | none
    project: str = "fwlab"  # W&B project
    entity: str | None = None  # W&B entity (team or user); None: the account's default
    # auto: online when W&B credentials exist and its server answers, else offline run files
    # (upload later with `wandb sync`); online; offline.
    mode: str = "auto"


class MatmulPrecision(str, Enum):
    """How float32 matrix products may run on GPUs (``torch.set_float32_matmul_precision``).

    cuDNN's LSTM uses TF32 tensor cores by default, so ``high`` puts every cell on its footing;
    fwlab's fused kernels use three TF32 products there, about float32's accuracy."""

    highest = "highest"  # IEEE float32
    high = "high"  # TF32 tensor cores
    medium = "medium"  # one TF32 or bfloat16 product


@dataclass
class RunConfig:
    seed: int = 1234  # seeds torch, numpy and Python for the run (not the data splits)
    # highest | high | medium: torch.set_float32_matmul_precision for the run
    float32_matmul_precision: MatmulPrecision = MatmulPrecision.high
    output_dir: str = "runs"  # each run gets a fresh directory under this one
    run_name: str | None = None  # part of the run directory's name and the W&B run's name
    experiment: str | None = None  # the experiment preset this run was composed from
    model: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    # what papers report for this set-up, shown beside the run's results (fwlab/published.py)
    published: list[PublishedResult] = field(default_factory=list)


# -- locating files -----------------------------------------------------------------------------
def config_dir() -> Path:
    """The directory of fwlab's YAML configs (``configs/`` in the repository)."""
    return Path(str(resources.files("fwlab.configs")))


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def group_file(group: str, name: str, required: bool) -> Path | None:
    path = config_dir() / group / f"{name}.yaml"
    if path.is_file():
        return path
    if not required:
        return None
    choices = group_choices(group)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" Did you mean {group}={close[0]}?" if close else ""
    raise ConfigError(
        f"{group}={name}: there is no {path}.{hint} Choices: {', '.join(choices) or '(none)'}"
    )


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as file:
            content = yaml.safe_load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(content).__name__}")
    return content


# -- schemas ------------------------------------------------------------------------------------
def _dataclass_fields(config_cls: type, skip: set[str]) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(config_cls)
    result = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = (  # with the field's metadata: its bounds, if it has any
            field(default_factory=f.default_factory, metadata=f.metadata)
            if f.default_factory is not dataclasses.MISSING
            else field(default=f.default, metadata=f.metadata)
        )
        result.append((f.name, hints[f.name], default))
    return result


def combined_schema(schema_name: str, name: str, parts: Sequence[type]) -> type:
    """A dataclass with a ``name`` field and the fields of every dataclass in ``parts``."""
    all_fields = [("name", str, field(default=name))]
    owners: dict[str, type] = {}
    for part in parts:
        for field_name, field_type, default in _dataclass_fields(part, skip={"name"}):
            if field_name in owners:
                raise ConfigError(
                    f"config field '{field_name}' is defined by both {owners[field_name].__name__}"
                    f" and {part.__name__}; a plugin must rename one"
                )
            owners[field_name] = part
            all_fields.append((field_name, field_type, default))
    return dataclasses.make_dataclass(schema_name, all_fields)


def model_schema(registry: Registry, name: str) -> type:
    """The ``model.*`` schema for ``--model name``: a registered model, or a cell in the
    generic sequence model."""
    if ("model", name) in registry:
        return combined_schema(f"{name}_model", name, [registry.get("model", name).Config])
    if ("cell", name) in registry:
        generic = registry.get("model", GENERIC_MODEL)
        return combined_schema(
            f"{name}_model", name, [generic.Config, registry.get("cell", name).Config]
        )
    raise ConfigError(registry.unknown_name_message("model", name, kinds=("model", "cell")))


def data_schema(registry: Registry, name: str) -> type:
    if ("data", name) not in registry:
        raise ConfigError(registry.unknown_name_message("data", name))
    return combined_schema(f"{name}_data", name, [registry.get("data", name).Config])


# -- checking keys ------------------------------------------------------------------------------
def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            if key != "trainer" or prefix:
                keys.extend(_dotted_keys(node._get_node(key), path + "."))
    return keys


def _unknown_key(path: str, source: str, candidates: Iterable[str]) -> None:
    close = difflib.get_close_matches(path, list(candidates), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown config key '{path}' (from {source}){hint}")


def check_keys(fragment: dict[str, Any], config: DictConfig, source: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``fragment`` that the schema lacks."""
    every_key = _dotted_keys(config)

    def walk(values: dict[str, Any], node: DictConfig, prefix: str) -> None:
        for key, value in values.items():
            path = f"{prefix}{key}"
            if path == "trainer":
                if not isinstance(value, dict):
                    raise ConfigError(f"'trainer' (from {source}) must be a mapping of keys")
                check_trainer_keys(value, source)
                continue
            if key not in node:
                _unknown_key(path, source, every_key)
            child = node._get_node(key)
            is_open = OmegaConf.get_type(node, key) is dict  # a free-form mapping
            if isinstance(value, dict) and isinstance(child, DictConfig) and not is_open:
                walk(value, child, path + ".")

    walk(fragment, config, "")


def check_trainer_keys(values: dict[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` for the first ``trainer.*`` key that fwlab sets itself or
    that ``lightning.Trainer`` lacks, or whose value its annotation refuses."""
    allowed = set(trainer_arguments.annotations())
    for key, value in values.items():
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(
                f"trainer.{key} (from {source}) is set by fwlab: {RESERVED_TRAINER_KEYS[key]}"
            )
        if key not in allowed:
            candidates = sorted(allowed - set(RESERVED_TRAINER_KEYS))
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean 'trainer.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key 'trainer.{key}' (from {source}): not an argument of "
                f"lightning.Trainer{hint}"
            )
        problem = trainer_arguments.value_problem(key, value)
        if problem is not None:
            raise ConfigError(
                f"bad value for 'trainer.{key}' (from {source}): lightning.Trainer's {key} "
                f"{problem}"
            )


def _check_names(fragment: dict[str, Any], config: DictConfig, source: str) -> None:
    """Refuse a ``model.name`` or ``data.name`` other than the one the config was built for:
    its fields are the chosen plugin's, so another name would build a plugin from them."""
    for group in ("model", "data"):
        section = fragment.get(group)
        name = section.get("name") if isinstance(section, dict) else None
        if name is not None and name != config[group].name:
            raise ConfigError(
                f"{group}.name={name} (from {source}): this run's {group} is "
                f"{config[group].name}; choose another with --{group} {name}"
            )


def merge_checked(config: DictConfig, fragment: dict[str, Any], source: str) -> DictConfig:
    """Merge ``fragment`` into ``config`` after checking its keys; bad values (of the wrong type,
    or outside a field's bounds) name the key."""
    check_keys(fragment, config, source)
    _check_names(fragment, config, source)
    if "published" in fragment:
        check_entries(fragment["published"], source)
    try:
        merged = OmegaConf.merge(config, fragment)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(error).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' (from {source}): {message}") from None
    assert isinstance(merged, DictConfig)
    _check_bounds(merged, fragment, source)
    if "published" in fragment:
        check_where_keys(merged, source)
    return merged


def _check_bounds(config: DictConfig, fragment: dict[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` for the first value ``fragment`` sets in a section of
    ``config`` (``model``, ``data``, ``optim``, ...) outside the bounds its field declares
    (:func:`fwlab.bounds.bounded`)."""
    for section, values in fragment.items():
        schema = OmegaConf.get_type(config, section) if section in config else None
        if not (isinstance(values, dict) and dataclasses.is_dataclass(schema)):
            continue
        merged = {}  # the values the fragment sets, as merged (interpolations resolved)
        for name in values:
            try:
                merged[name] = config[section][name]
            except OmegaConfBaseException:  # an interpolation not resolvable yet
                pass
        found = out_of_bounds(schema, merged)
        if found is not None:
            name, problem = found
            raise ConfigError(f"bad value for '{section}.{name}' (from {source}): {problem}")


# -- overrides ----------------------------------------------------------------------------------
def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Split ``key=value`` arguments into group selections and a nested dict of values."""
    selections: dict[str, str] = {}
    dotlist: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument '{item}' is not of the form key=value")
        if key in GROUPS:
            selections[key] = value
        else:
            dotlist.append(item)
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot parse overrides {dotlist}: {error}") from None
    return selections, values  # type: ignore[return-value]


# -- composing ----------------------------------------------------------------------------------
def compose(
    registry: Registry,
    *,
    model: str | None = None,
    data: str | None = None,
    overrides: Sequence[str] = (),
    config_files: Sequence[str | Path] = (),
    base: dict[str, Any] | None = None,
    base_source: str = "the saved config",
) -> DictConfig:
    """The resolved run config. ``base`` is a saved config (resume, test from a checkpoint):
    it replaces the group files, and the command line still applies on top."""
    selections, values = parse_overrides(overrides)
    if base is not None:
        chosen: dict[str, str | None] = {
            "model": base.get("model", {}).get("name"),
            "data": base.get("data", {}).get("name"),
        }
        group_names = [g for g in ("trainer", "logger", "experiment") if g in selections]
    else:
        chosen = dict(load_yaml(config_dir() / "config.yaml").get("defaults", {}))
        group_names = ["trainer", "logger", "model", "data", "experiment"]
    experiment = selections.get("experiment")
    experiment_fragment: dict[str, Any] = {}
    if experiment is not None:
        experiment_path = group_file("experiment", experiment, required=True)
        experiment_fragment = load_yaml(experiment_path)
        chosen.update(experiment_fragment.pop("defaults", {}) or {})
    chosen.update(selections)
    chosen.update({k: v for k, v in (("model", model), ("data", data)) if v is not None})
    for group in ("model", "data") if base is not None else ():
        saved = base.get(group, {}).get("name")
        if saved is not None and chosen[group] != saved:  # its weights are the saved one's
            raise ConfigError(
                f"--{group} {chosen[group]}: {base_source} is for {group} {saved}; a resumed or "
                f"evaluated run keeps its model and data (drop --{group}; {group}.* keys change "
                "their settings)"
            )
    for required in ("model", "data"):
        if not chosen.get(required):
            raise ConfigError(
                f"no {required} given: pass --{required} NAME (see `fwlab list {required}`)"
            )

    config = OmegaConf.structured(RunConfig)
    config.model = OmegaConf.structured(model_schema(registry, chosen["model"]))
    config.data = OmegaConf.structured(data_schema(registry, chosen["data"]))
    if experiment is not None:
        config.experiment = experiment

    if base is not None:
        config = merge_checked(config, base, base_source)
    for group in group_names:
        name = chosen.get(group)
        if name is None:
            continue
        if group == "experiment":
            fragment, source = experiment_fragment, f"experiment/{name}.yaml"
        else:
            path = group_file(group, name, required=group in ("trainer", "logger"))
            if path is None:
                continue
            fragment, source = load_yaml(path), str(path)
            fragment.pop("defaults", None)
        config = merge_checked(config, fragment, source)
    for path in config_files:
        fragment = load_yaml(Path(path))
        chosen_in_file = fragment.pop("defaults", None)
        if chosen_in_file:
            raise ConfigError(f"{path}: 'defaults' is only read from experiment presets")
        config = merge_checked(config, fragment, str(path))
    config = merge_checked(config, values, "the command line")
    try:
        OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"incomplete config: {str(error).splitlines()[0]}") from None
    check_optim_config(dataclass_from(OptimConfig, config.optim))  # before anything is written
    return config


def dataclass_from(config_cls: type, node: DictConfig) -> Any:
    """An instance of the dataclass ``config_cls`` from the keys of ``node`` it declares (a
    model's section also holds the keys of its cell, a run's data section its name)."""
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    return config_cls(**{f.name: values[f.name] for f in dataclasses.fields(config_cls)})


def to_plain(config: DictConfig) -> dict[str, Any]:
    """A resolved, plain-Python copy of a config (enums as strings), for saving and logging."""
    return OmegaConf.to_container(config, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))
