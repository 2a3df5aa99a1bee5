"""scripts/bench.py end to end at a tiny shape: the rows, the JSON, the ratios to torch.nn.LSTM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

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


def load_bench():
    """scripts/bench.py as a module."""
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_fused_path_is_offered_only_where_the_kernel_takes_the_settings(capsys):
    bench = load_bench()
    assert bench._fused_applies("fast_weights", "cuda") and bench._fused_applies("irnn", "cuda")
    assert not bench._fused_applies("fast_weights:form=matrix,checkpoint_every=28", "cuda")
    assert "model.form=matrix" in capsys.readouterr().err
    # on the CPU the fused path is a C kernel, which bn_lstm and lru_ntm have and irnn has not;
    # on CUDA a Triton kernel, which all three have
    for cell in ("bn_lstm", "lru_ntm"):
        assert bench._fused_applies(cell, "cpu") and bench._fused_applies(cell, "cuda")
    assert not bench._fused_applies("irnn", "cpu")
    assert "irnn has no c kernel" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # each was a traceback, or a table of per-case errors, or a long run of failing cases
        (["--shapes", "12x3"], "--shapes 12x3: expected BxTxIxH"),
        (["--cells", "elman"], "--cells elman: not a registered cell"),
        (["--variants", "lru_ntm:nokey=1"], "--variants lru_ntm:nokey=1: TypeError"),
        (["--variants", "lru_ntm:write_vector=bogus"], "'bogus' is not a valid WriteVector"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: torch sees no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here"),
        ),
    ],
)
def test_bad_arguments_stop_the_bench_before_it_measures(
    tmp_path, arguments, message, monkeypatch, capsys
):
    output = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", *arguments, "--json", str(output)])
    with pytest.raises(SystemExit) as stopped:
        load_bench().main()
    assert stopped.value.code == 2  # argparse's usage error
    assert message in capsys.readouterr().err and not output.exists()
