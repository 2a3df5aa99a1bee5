"""The plugin registry: entry points, local files, duplicates, broken plugins, suggestions."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest

from fwlab.registry import PluginImportWarning, Registry, RegistryError

from .conftest import fwlab_env, run_fwlab

PLUGIN_MODULE = textwrap.dedent(
    '''
    """A third-party plugin package."""
    from dataclasses import dataclass
    from fwlab_plugins.cells.lstm import LSTMCell


    class ThirdPartyCell(LSTMCell):
        """A third-party cell installed with pip."""
    '''
)


def install_fake_distribution(
    site: Path, name: str, entry_points: str, module_source: str | None = None
) -> None:
    """Lay out what `pip install` leaves: a module and a .dist-info with entry_points.txt."""
    if module_source is not None:
        (site / f"{name}.py").write_text(module_source)
    dist_info = site / f"{name}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in ("thirdparty", "brokenplugin"):
        sys.modules.pop(name, None)


def test_builtins_are_found_through_entry_points():
    groups = {
        g: {ep.name for ep in importlib.metadata.entry_points(group=g)}
        for g in ("fwlab.cells", "fwlab.data", "fwlab.models")
    }
    assert {"lstm", "fast_weights"} <= groups["fwlab.cells"]
    assert "retrieval" in groups["fwlab.data"]
    assert "sequence" in groups["fwlab.models"]
    registry = Registry()
    assert {"lstm", "fast_weights"} <= set(registry.names("cell"))
    assert "package 'fwlab" in registry.entry("cell", "lstm").source


def test_an_installed_package_adds_its_names(site):
    install_fake_distribution(
        site,
        "thirdparty",
        "[fwlab.cells]\nthird_party = thirdparty:ThirdPartyCell\n",
        PLUGIN_MODULE,
    )
    registry = Registry()
    assert "third_party" in registry.names("cell")
    assert "thirdparty" not in sys.modules  # names come from metadata; nothing imported yet
    cell_cls = registry.get("cell", "third_party")
    assert cell_cls.__name__ == "ThirdPartyCell"
    assert "package 'thirdparty 1.0'" in registry.entry("cell", "third_party").source


def test_duplicate_entry_point_names_both_sources(site):
    install_fake_distribution(site, "thirdparty", "[fwlab.cells]\nlstm = thirdparty:X\n", "X = 1")
    with pytest.raises(RegistryError) as error:
        Registry()
    message = str(error.value)
    assert "duplicate cell name 'lstm'" in message
    assert "package 'fwlab" in message and "package 'thirdparty 1.0'" in message


def test_a_broken_plugin_warns_and_the_rest_keeps_working(site):
    install_fake_distribution(
        site,
        "brokenplugin",
        "[fwlab.cells]\nbroken = brokenplugin:Cell\n",
        "raise ImportError('needs a missing library')\n",
    )
    registry = Registry()
    with pytest.warns(PluginImportWarning, match="'broken'.*brokenplugin.*needs a missing library"):
        rows = registry.describe("cell")
    names = [name for name, _, _ in rows]
    assert "broken" not in names and {"lstm", "fast_weights"} <= set(names)
    with pytest.raises(RegistryError, match="cell plugin 'broken' from package 'brokenplugin"):
        registry.get("cell", "broken")
    assert registry.get("cell", "lstm").__name__ == "LSTMCell"


LOCAL_PLUGIN = textwrap.dedent(
    '''
    """A local plugin file, loaded with --plugin."""
    from fwlab import register
    from fwlab_plugins.cells.lstm import LSTMCell


    @register("cell", "{name}")
    class LocalCell(LSTMCell):
        """A cell from a local file."""
    '''
)


def test_a_local_plugin_file_registers_its_names(tmp_path):
    path = tmp_path / "my_plugin.py"
    path.write_text(LOCAL_PLUGIN.format(name="local_cell"))
    registry = Registry()
    registry.load_plugin(str(path))
    assert registry.get("cell", "local_cell").__name__ == "LocalCell"
    assert str(path) in registry.entry("cell", "local_cell").source


def test_a_local_plugin_reusing_a_name_is_an_error_naming_both(tmp_path):
    path = tmp_path / "clash.py"
    path.write_text(LOCAL_PLUGIN.format(name="lstm"))
    with pytest.raises(RegistryError) as error:
        Registry().load_plugin(str(path))
    assert "package 'fwlab" in str(error.value) and str(path) in str(error.value)


def test_a_broken_local_plugin_warns(tmp_path):
    path = tmp_path / "broken_local.py"
    path.write_text("import a_module_that_does_not_exist\n")
    registry = Registry()
    with pytest.warns(PluginImportWarning, match="broken_local.py"):
        registry.load_plugin(str(path))
    assert "lstm" in registry.names("cell")


def test_a_missing_plugin_file_is_an_error(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        Registry().load_plugin(str(tmp_path / "nope.py"))


def test_unknown_names_suggest_close_matches():
    registry = Registry()
    with pytest.raises(RegistryError, match="did you mean 'fast_weights'"):
        registry.get("cell", "fast_weight")
    with pytest.raises(RegistryError, match="did you mean 'retrieval'"):
        registry.get("data", "retreival")


def test_fwlab_list_shows_every_kind_with_descriptions(tmp_path):
    result = run_fwlab("list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cell:"
    for name in ("lstm", "fast_weights", "retrieval", "sequence"):
        row = next(line for line in lines if line.split()[:1] == [name])
        assert len(row.split()) > 2  # a description follows the name


def test_fwlab_list_loads_plugins_from_flag_and_environment(tmp_path):
    flag_file = tmp_path / "flag_plugin.py"
    flag_file.write_text(LOCAL_PLUGIN.format(name="from_flag"))
    env_file = tmp_path / "env_plugin.py"
    env_file.write_text(LOCAL_PLUGIN.format(name="from_env"))
    env = fwlab_env(tmp_path)
    env["FWLAB_PLUGINS"] = str(env_file)
    result = run_fwlab("list", "cell", "--plugin", str(flag_file), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "from_flag" in result.stdout and "from_env" in result.stdout
