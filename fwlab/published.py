"""Published numbers beside a run's own: a preset states what a paper reports for the set-up it
encodes, and the run prints and records that next to what it measured.

An experiment preset (``configs/experiment/*.yaml``), or any config file, lists under
``published`` what the paper reports, in the units fwlab logs the metric in::

    published:
      - source: Ba et al. 2016, Table 1, fast weights, R = 20 (recalled)
        where: {model.hidden_size: 20}
        metrics: {test/acc: 0.9819}  # 1.81 % test error

An entry applies to a run whose config has every ``where`` value (an entry without ``where``
always applies), so one preset can carry a table's row for each setting a user may choose. At the
end of ``fit`` and ``test`` the summary shows each applying entry's numbers beside the run's;
``results.json`` records them under ``published``, and the W&B run's summary as
``published/<metric>``. When no entry applies, the summary says which setting differs instead
of comparing numbers measured under another set-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fwlab.errors import ConfigError

_ABSENT = object()


@dataclass
class PublishedResult:
    """One published result: where it comes from, the set-up it is for, and its numbers."""

    source: str = MISSING  # paper, table or figure, the row, and whether verified or recalled
    # logged metric (e.g. test/acc, test/instance_2) -> the published value, in fwlab's units
    metrics: dict[str, float] = field(default_factory=dict)
    # config key (e.g. model.hidden_size) -> the value the published number was obtained with
    where: dict[str, Any] = field(default_factory=dict)


def check_entries(entries: Any, source: str) -> None:
    """Raise :class:`ConfigError` for the first malformed entry of a config fragment's
    ``published`` list (an unknown field, a value that is not a number, no ``source``), naming
    the entry by its index."""
    if not isinstance(entries, list):
        raise ConfigError(f"'published' (from {source}) must be a list of entries")
    for index, entry in enumerate(entries):
        where = f"published[{index}]"
        try:
            checked = OmegaConf.merge(OmegaConf.structured(PublishedResult), entry)
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", None) or "?"
            message = str(error).splitlines()[0]
            raise ConfigError(f"bad value for '{where}.{key}' (from {source}): {message}") from None
        if OmegaConf.is_missing(checked, "source"):
            raise ConfigError(f"{where} (from {source}) has no 'source': say where it is published")


def check_where_keys(config: DictConfig, source: str) -> None:
    """Raise :class:`ConfigError` if a ``published`` entry's ``where`` names a key the run's
    config lacks: such an entry could never apply, silently."""
    for index, entry in enumerate(config.get("published") or []):
        for key in entry.where:
            if OmegaConf.select(config, key, default=_ABSENT) is _ABSENT:
                raise ConfigError(
                    f"published[{index}].where (from {source}): '{key}' is not a config key of "
                    f"this run (--model {config.model.name} --data {config.data.name})"
                )


def _setting(plain: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a plain config."""
    node: Any = plain
    for part in key.split("."):
        node = node[part]
    return node


def applies(entry: dict[str, Any], plain: dict[str, Any]) -> bool:
    """Whether the run whose plain config is ``plain`` has every setting ``entry`` is for."""
    return all(_setting(plain, key) == value for key, value in entry["where"].items())


def compare(plain: dict[str, Any], results: dict[str, float]) -> list[dict[str, Any]]:
    """The entries of ``plain["published"]`` that apply to the run, each metric's published
    value beside the run's (``None`` where this command did not log it)."""
    return [
        {
            "source": entry["source"],
            "where": entry["where"],
            "metrics": {
                metric: {"published": value, "measured": results.get(metric)}
                for metric, value in entry["metrics"].items()
            },
        }
        for entry in plain.get("published") or []
        if applies(entry, plain)
    ]


def summary_lines(plain: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[str]:
    """The end-of-run summary's lines for the published numbers: the applying entries' beside
    the run's, or, when none applies, what each entry is for and what this run has."""
    lines = []
    for comparison in comparisons:
        lines.append(f"published:       {comparison['source']}")
        for metric, values in comparison["metrics"].items():
            measured = values["measured"]
            this_run = "not logged by this command" if measured is None else f"{measured:.4g}"
            lines.append(
                f"  {metric:<17}{values['published']:<8.4g} published   {this_run} this run"
            )
    entries = plain.get("published") or []
    if entries and not comparisons:
        for entry in entries:
            wanted = ", ".join(f"{key}={value}" for key, value in entry["where"].items())
            has = ", ".join(f"{key}={_setting(plain, key)}" for key in entry["where"])
            lines.append(f"not compared:    {entry['source']}: for {wanted}; this run has {has}")
    return lines
