"""A model and a datamodule that cannot work together fail before training, clearly."""

from __future__ import annotations

import textwrap

from .conftest import run_fwlab

PLUGIN = textwrap.dedent(
    '''
    from dataclasses import dataclass

    from fwlab import DataModule, DataSpec, IncompatibleError, register
    from fwlab_plugins.cells.lstm import LSTMCell


    @register("data", "per_step_ranking")
    class PerStepRanking(DataModule):
        """Targets of a kind the generic model does not handle."""

        @property
        def spec(self):
            return DataSpec("vectors", 3, "ranking_per_step", seq_len=5)


    @register("cell", "vectors_only")
    class VectorsOnlyCell(LSTMCell):
        """A cell that refuses token inputs."""

        @classmethod
        def check_compatible(cls, config, spec):
            if spec.input_kind != "vectors":
                raise IncompatibleError(f"vectors_only needs vector inputs, got {spec.input_kind}")
    '''
)


def test_an_unhandled_target_kind_fails_before_training(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    result = run_fwlab(
        "fit",
        "--plugin",
        str(plugin),
        "--model",
        "lstm",
        "--data",
        "per_step_ranking",
        "logger=none",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "unknown target kind 'ranking_per_step'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_cell_can_refuse_a_datamodule(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    result = run_fwlab(
        "fit",
        "--plugin",
        str(plugin),
        "--model",
        "vectors_only",
        "--data",
        "retrieval",
        "logger=none",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "vectors_only needs vector inputs, got tokens" in result.stderr
    assert not (tmp_path / "runs").exists()
