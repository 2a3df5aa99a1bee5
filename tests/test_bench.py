"""scripts/bench.py end to end at a tiny shape: the rows, the JSON, the ratios to torch.nn.LSTM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import REPO


# a subprocess per case (the default), or every case in bench.py's own process
@pytest.mark.parametrize("in_process", [False, True], ids=["subprocesses", "in-process"])
def test_bench_writes_a_row_per_case_with_the_ratio_to_the_lstm(tmp_path, in_process):
    output = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "scripts" / "bench.py"), "--cells", "bn_lstm",
               "--variants", "--shapes", "4x3x2x5", "--min-time", "0.01",
               "--device", "cpu", "--paired", "--json", str(output)]  # fmt: skip
    if in_process:
        command.append("--in-process")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(output.read_text())
    assert [(row["cell"], row["path"]) for row in rows] == [
        ("torch.nn.LSTM", "eager"),
        ("bn_lstm", "eager"),
        ("bn_lstm", "fused"),  # on the CPU: its C kernel
    ]
    for row in rows:
        assert {"cell", "shape", "device", "path", "seq_per_s", "peak_mib", "ratio_vs_lstm"} <= set(
            row
        )
        assert row["shape"] == "4x3x2x5" and row["device"] == "cpu" and row["seq_per_s"] > 0
    assert rows[0]["ratio_vs_lstm"] == 1.0
    # --paired: the LSTM timed against itself in alternating slices comes out near 1
    for row in rows:
        low, high = row["ratio_vs_lstm_paired_quartiles"]
        assert low <= row["ratio_vs_lstm_paired"] <= high and row["paired_slices"] >= 3
    assert 0.5 < rows[0]["ratio_vs_lstm_paired"] < 2.0
    assert "vs LSTM" in done.stdout and "bn_lstm" in done.stdout


def test_the_fused_path_is_offered_only_where_the_kernel_takes_the_settings(capsys):
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._fused_applies("fast_weights", "cuda") and bench._fused_applies("irnn", "cuda")
    assert not bench._fused_applies("fast_weights:form=matrix,checkpoint_every=28", "cuda")
    assert "model.form=matrix" in capsys.readouterr().err
    # on the CPU the fused path is a C kernel, which bn_lstm and lru_ntm have and irnn has not;
    # on CUDA a Triton kernel, which all three have
    for cell in ("bn_lstm", "lru_ntm"):
        assert bench._fused_applies(cell, "cpu") and bench._fused_applies(cell, "cuda")
    assert not bench._fused_applies("irnn", "cpu")
    assert "irnn has no c kernel" in capsys.readouterr().err
