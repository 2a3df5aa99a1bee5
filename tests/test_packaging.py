"""The wheel holds every package and the C sources: pyproject.toml lists them one by one
(setuptools' explicit ``packages`` and ``package-data``), so a new subpackage or C kernel left off
the lists would work in an editable install and be missing from a real one."""

from __future__ import annotations

from fnmatch import fnmatch

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


def test_every_c_kernel_source_and_header_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    sources = [*(REPO / "fwlab_plugins").rglob("*.c"), *(REPO / "fwlab_plugins").rglob("*.h")]
    assert sources  # the test looks where the kernels are
    for source in sources:
        package = ".".join(source.parent.relative_to(REPO).parts)
        patterns = package_data.get(package, [])
        assert any(fnmatch(source.name, pattern) for pattern in patterns), source
