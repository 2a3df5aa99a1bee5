"""The wheel holds every package: pyproject.toml lists them one by one (setuptools' explicit
``packages``), so a new subpackage left off the list would work in an editable install and be
missing from a real one."""

from __future__ import annotations

import pytest

from .conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_python_package_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for root in ("fwlab", "fwlab_plugins")
        for init in (REPO / root).rglob("__init__.py")
    }
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
