"""The plugin registry: cells, datamodules and models, found by name.

Plugins arrive two ways, and fwlab's own built-ins use the first exactly as a third-party
package would:

1. **Entry points.** A package declares, in its ``pyproject.toml``::

       [project.entry-points."fwlab.cells"]
       my_cell = "my_package.cells:MyCell"

   ``pip install my-package`` is then enough for ``--model my_cell`` to work. Names are read from
   the package metadata without importing anything; a plugin's module is imported only when its
   name is used (or when ``fwlab list`` asks for descriptions).
2. **Local files or modules**, unpackaged: ``--plugin path/to/file.py`` (or a module name), or the
   ``FWLAB_PLUGINS`` environment variable (paths or modules separated by ``os.pathsep``). Such a
   file registers its objects with the :func:`register` decorator.

A name registered twice within a kind is an error naming both sources. A plugin whose import
fails is reported as a warning naming it, and every other plugin keeps working.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwlab.errors import RegistryError

# kind -> entry-point group
ENTRY_POINT_GROUPS: dict[str, str] = {
    "cell": "fwlab.cells",
    "data": "fwlab.data",
    "model": "fwlab.models",
}
KINDS: tuple[str, ...] = tuple(ENTRY_POINT_GROUPS)
PLUGINS_ENV_VAR = "FWLAB_PLUGINS"


class PluginImportWarning(UserWarning):
    """A plugin could not be imported; the others still work."""


@dataclass
class Entry:
    """One registered name. ``load`` imports the object on first use."""

    kind: str
    name: str
    source: str  # where it came from, for error messages: a distribution or a file
    load: Callable[[], Any]
    _object: Any = field(default=None, repr=False)
    _error: Exception | None = field(default=None, repr=False)

    def get(self) -> Any:
        if self._object is None and self._error is None:
            try:
                self._object = self.load()
            except Exception as error:  # noqa: BLE001 - any import failure is the plugin's fault
                self._error = error
        if self._error is not None:
            raise RegistryError(
                f"{self.kind} plugin '{self.name}' from {self.source} failed to import: "
                f"{type(self._error).__name__}: {self._error}"
            ) from self._error
        return self._object

    @property
    def description(self) -> str:
        doc = (getattr(self.get(), "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else "(no description)"


def _entry_point_source(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    package = f"package '{dist.name} {dist.version}'" if dist is not None else "an unnamed package"
    return f"{package} (entry point {entry_point.value})"


class Registry:
    """Names of every kind of plugin, mapped to lazily imported objects."""

    def __init__(self, discover: bool = True) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._loaded_plugins: set[str] = set()
        if discover:
            self.discover_entry_points()

    # -- adding -------------------------------------------------------------------------------
    def _add_entry(self, entry: Entry) -> None:
        if entry.kind not in self._entries:
            raise RegistryError(f"unknown plugin kind '{entry.kind}': expected one of {KINDS}")
        existing = self._entries[entry.kind].get(entry.name)
        if existing is not None:
            if existing._object is not None and existing._object is entry._object:
                return  # the same object seen twice (e.g. a module imported both ways)
            raise RegistryError(
                f"duplicate {entry.kind} name '{entry.name}': registered by {existing.source} "
                f"and by {entry.source}; rename one of them"
            )
        self._entries[entry.kind][entry.name] = entry

    def add(self, kind: str, name: str, obj: Any, source: str) -> None:
        """Register an already imported object."""
        entry = Entry(kind, name, source, load=lambda: obj)
        entry._object = obj
        self._add_entry(entry)

    def discover_entry_points(self) -> None:
        """Read every installed package's ``fwlab.*`` entry points (names only, no imports)."""
        for kind, group in ENTRY_POINT_GROUPS.items():
            for entry_point in importlib.metadata.entry_points(group=group):
                self._add_entry(
                    Entry(
                        kind, entry_point.name, _entry_point_source(entry_point), entry_point.load
                    )
                )

    def load_plugin(self, spec: str) -> None:
        """Import a local plugin: a ``.py`` file path or an importable module name.

        The module registers its objects with :func:`register` while it is imported.
        """
        if spec in self._loaded_plugins:
            return
        self._loaded_plugins.add(spec)
        previous = _active.registry
        _active.registry = self
        try:
            if spec.endswith(".py") or os.sep in spec or Path(spec).exists():
                path = Path(spec).expanduser().resolve()
                if not path.is_file():
                    raise RegistryError(f"plugin file '{spec}' does not exist (looked at {path})")
                module_name = f"fwlab_local_plugin_{path.stem}_{abs(hash(str(path))):x}"
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except RegistryError:
            raise
        except Exception as error:  # noqa: BLE001
            warnings.warn(
                f"plugin '{spec}' failed to import and is skipped: {type(error).__name__}: {error}",
                PluginImportWarning,
                stacklevel=2,
            )
        finally:
            _active.registry = previous

    def load_plugins(self, specs: Iterable[str]) -> None:
        for spec in specs:
            self.load_plugin(spec)

    # -- looking up ---------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def __contains__(self, kind_and_name: tuple[str, str]) -> bool:
        kind, name = kind_and_name
        return name in self._entries.get(kind, {})

    def entry(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[kind][name]
        except KeyError:
            raise RegistryError(self.unknown_name_message(kind, name)) from None

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).get()

    def unknown_name_message(self, kind: str, name: str, kinds: Iterable[str] = ()) -> str:
        kinds = tuple(kinds) or (kind,)
        known = sorted({n for k in kinds for n in self._entries[k]})
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return (
            f"unknown {'/'.join(kinds)} '{name}': {hint}"
            f"known: {', '.join(known) or '(none)'} (see `fwlab list`)"
        )

    def describe(self, kind: str) -> list[tuple[str, str, str]]:
        """``(name, one-line description, source)`` for every importable plugin of ``kind``.

        A plugin that fails to import is reported as a warning and left out.
        """
        rows = []
        for name in self.names(kind):
            entry = self._entries[kind][name]
            try:
                rows.append((name, entry.description, entry.source))
            except RegistryError as error:
                warnings.warn(str(error), PluginImportWarning, stacklevel=2)
        return rows


class _ActiveRegistry:
    registry: Registry | None = None


_active = _ActiveRegistry()


def default_registry(plugins: Iterable[str] = ()) -> Registry:
    """The process-wide registry: installed entry points, ``FWLAB_PLUGINS``, then ``plugins``."""
    if _active.registry is None:
        _active.registry = Registry()
        env = os.environ.get(PLUGINS_ENV_VAR, "")
        _active.registry.load_plugins(s for s in env.split(os.pathsep) if s)
    _active.registry.load_plugins(plugins)
    return _active.registry


def reset_default_registry() -> None:
    """Forget the process-wide registry (tests, or after installing a package at run time)."""
    _active.registry = None


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Register a class in a local plugin file::

    from fwlab import Cell, register

    @register("cell", "my_cell")
    class MyCell(Cell):
        ...
    """

    def decorator(obj: Any) -> Any:
        module = sys.modules.get(getattr(obj, "__module__", ""), None)
        source = f"file {getattr(module, '__file__', None) or getattr(obj, '__module__', '?')}"
        registry = _active.registry if _active.registry is not None else default_registry()
        registry.add(kind, name, obj, source)
        return obj

    return decorator
