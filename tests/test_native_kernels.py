"""The C kernels' build (fwlab_plugins.cells.kernels.native): compiled once into the cache and
reused, a missing or failing compiler reported (``auto`` falls back, ``c`` fails), and the
process's floating-point mode left as it was."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwlab.errors import ConfigError
from fwlab_plugins.cells.bn_lstm import BNLSTMCell, BNLSTMConfig
from fwlab_plugins.cells.kernels import bn_lstm_cpu, lru_ntm_cpu, native
from fwlab_plugins.cells.lru_ntm import LRUNTMCell, LRUNTMConfig

from .conftest import fwlab_env, made_by, run_fwlab

pytestmark = pytest.mark.skipif(
    native.unavailable_reason(bn_lstm_cpu.SOURCE) is not None, reason="no C compiler here"
)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty kernel cache, and no library loaded by this process yet."""
    monkeypatch.setenv("FWLAB_KERNEL_CACHE", str(tmp_path))
    native.load.cache_clear()
    native.unavailable_reason.cache_clear()
    yield tmp_path
    native.load.cache_clear()  # the next test loads from its own settings
    native.unavailable_reason.cache_clear()


def test_a_kernel_is_built_once_into_the_cache_and_reused_by_another_process(fresh_build):
    native.load(bn_lstm_cpu.SOURCE)
    (library,) = fresh_build.iterdir()  # the library alone: no build folder left behind
    assert library.name.startswith("bn_lstm_cpu-") and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    # the other process also checks that loading the library keeps denormal numbers (linking
    # with -ffast-math would switch the whole process to flush-to-zero)
    code = (
        "import torch; from fwlab_plugins.cells.kernels import bn_lstm_cpu, native; "
        "native.load(bn_lstm_cpu.SOURCE); print((torch.tensor([1e-38]) / 100).item())"
    )
    env = {**os.environ, "FWLAB_KERNEL_CACHE": str(fresh_build)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(fresh_build.iterdir()) == [library] and library.stat().st_mtime_ns == built
    assert float(done.stdout) == pytest.approx(1e-40, rel=1e-3)  # not flushed to 0


def test_an_edit_to_an_included_file_builds_a_new_library(fresh_build, tmp_path):
    """A kernel's library depends on the files its source includes from its own folder (as
    lru_ntm_cpu.c includes step_products.h): an edit to one must not reuse the cached build."""
    sources = tmp_path / "sources"
    sources.mkdir()
    source, header = sources / "answer.c", sources / "answer.h"
    source.write_text('#include "answer.h"\nint NAME(answer)(void) { return ANSWER; }\n')
    answers = []
    for value in (41, 42):
        header.write_text(f"#undef ANSWER\n#define ANSWER {value}\n")
        native.load.cache_clear()
        answers.append(native.load(source).answer_float())
    assert answers == [41, 42]
    assert len(list(fresh_build.glob("answer-*.so"))) == 2
    header.unlink()  # a missing header is the compiler's to report, by name
    native.load.cache_clear()
    with pytest.raises(native.NativeKernelUnavailable, match="answer.h"):
        native.load(source)


def test_a_pass_that_cannot_allocate_raises_memory_error(fresh_build, tmp_path):
    """A kernel's pass returns −1 when it cannot allocate its working memory, packed weights and
    scratch (having computed nothing): run_pass says so as a MemoryError naming the pass, and a
    pass returning 0 passes."""
    source = tmp_path / "passes.c"
    source.write_text(
        "#include <stdint.h>\n"
        "int NAME(refuse)(const int64_t *steps_seen, int64_t steps) { return -1; }\n"
        "int NAME(count)(int64_t *steps_seen, int64_t steps) { *steps_seen = steps; return 0; }\n"
    )
    buffers = native.structure("Seen", ["steps"], [], [])(0)
    native.run_pass(source, "count_float", buffers, 7)
    assert buffers.steps == 7
    with pytest.raises(MemoryError, match="refuse_double: cannot allocate the packed weights"):
        native.run_pass(source, "refuse_double", buffers, 7)


@pytest.mark.parametrize(
    "compiler, reason",
    [("no-such-cc", "no C compiler ('no-such-cc' is not on PATH"), ("false", "false -O3 … failed")],
)
def test_without_a_working_compiler_auto_runs_torch_and_c_says_why(
    fresh_build, monkeypatch, caplog, compiler, reason
):
    monkeypatch.setenv("CC", compiler)
    x = torch.randn(4, 3, 2)
    with caplog.at_level(logging.INFO):
        outputs, _ = BNLSTMCell(2, BNLSTMConfig(hidden_size=5))(x)  # kernel=auto
    assert made_by(outputs, "BNLSTMSequence") and not made_by(outputs, "BNLSTMSequenceC")
    assert f"bn_lstm: plain PyTorch loop ({reason}" in caplog.text
    expected = r"model\.kernel=c: " + reason.split("(")[0]
    if compiler == "no-such-cc":  # no compiler at all: refused as the cell is built
        with pytest.raises(ConfigError, match=expected + ".*model.kernel=auto runs bn_lstm"):
            BNLSTMCell(2, BNLSTMConfig(hidden_size=5, kernel="c"))
    else:  # one that fails is found by building, at the first batch
        with pytest.raises(RuntimeError, match=expected):
            BNLSTMCell(2, BNLSTMConfig(hidden_size=5, kernel="c"))(x)
    assert not list(fresh_build.glob("*.so"))


def test_the_cli_refuses_kernel_c_without_a_compiler_before_writing_anything(tmp_path):
    env = {**fwlab_env(tmp_path), "CC": "no-such-cc"}
    result = run_fwlab(
        "fit", "--model", "lru_ntm", "--data", "retrieval", "model.kernel=c", cwd=tmp_path, env=env
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fwlab: error: model.kernel=c: no C compiler ('no-such-cc' is not on PATH" in (
        result.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_cache_is_reported_with_the_setting_that_moves_it(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FWLAB_KERNEL_CACHE", str(blocker / "kernels"))  # a folder inside a file
    reason = native.unavailable_reason(bn_lstm_cpu.SOURCE)
    assert f"cannot build in the kernel cache {blocker / 'kernels'}" in reason
    assert "FWLAB_KERNEL_CACHE" in reason


def test_a_compiler_without_openmp_builds_kernels_that_run_on_one_thread(fresh_build, monkeypatch):
    """OpenMP is taken where the compiler has it (the library's loops then call the OpenMP
    runtime: torch's own, in this process), and a compiler without it still builds the kernel."""
    system_compiler = os.environ.get("CC", "cc")  # the one native.load builds with
    with_openmp = Path(native.load(lru_ntm_cpu.SOURCE)._name)
    probe = subprocess.run(
        [system_compiler, "-fopenmp", "-x", "c", "-", "-o", str(fresh_build / "probe")],
        input="int main(void) { return 0; }\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        assert b"omp_get_thread_num" in with_openmp.read_bytes()
    native.load.cache_clear()
    compiler = fresh_build / "bin" / "cc-without-openmp"
    compiler.parent.mkdir()
    compiler.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "no -fopenmp" >&2; exit 1; }; done\n'
        f'exec {system_compiler} "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    without_openmp = Path(native.load(lru_ntm_cpu.SOURCE)._name)
    assert without_openmp != with_openmp
    assert b"omp_get_thread_num" not in without_openmp.read_bytes()
    torch.manual_seed(0)
    config = LRUNTMConfig(hidden_size=5, memory_slots=6, memory_width=3)
    reference = LRUNTMCell(2, config)
    fused = LRUNTMCell(2, dataclasses.replace(config, kernel="c"))
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 2)
    outputs = fused(x)[0]
    assert made_by(outputs, "LRUNTMSequenceC")
    torch.testing.assert_close(outputs, reference(x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernels_activations_match_torch_to_their_precision(fresh_build, tmp_path, dtype):
    """activations.h, built as the kernels are (-ffast-math, the vector flags): e^x (inline in
    float32: range reduction by ln 2 and a polynomial; exp in float64), σ and tanh, on a grid
    over [−100, 100] against float64 torch. e^x within 2 ulps where float32 has it as a normal
    number ([−87, 88]); σ = 1 / (1 + e^−x) and tanh = 2 / (1 + e^−2x) − 1 within what their own
    roundings give in float32 (4e-7 near tanh(2), against 3e-8 for torch's tanh), and finite
    at the saturated ends, where e^−x overflows: with -ffast-math, libm's exp there made σ and
    tanh NaN (below −44 for tanh) before the kernels clamped x (and float64's beyond ±709), as
    ±1000 checks. In float64 within 1e-15."""
    header = Path(lru_ntm_cpu.SOURCE).with_name("activations.h")
    source = tmp_path / "activations.c"
    source.write_text(
        f'#include "{header}"\n'
        "void NAME(activate)(const REAL *x, REAL *e, REAL *s, REAL *t, int64_t n) {\n"
        "    for (int64_t k = 0; k < n; k++) {\n"
        "        e[k] = NAME(exp_)(x[k]);\n"
        "        s[k] = NAME(sigmoid)(x[k]);\n"
        "        t[k] = NAME(tanh_)(x[k]);\n"
        "    }\n"
        "}\n"
    )
    library = native.load(source)
    grid = torch.linspace(-100, 100, 400_001, dtype=dtype)
    x = torch.cat([grid, torch.tensor([-1000.0, 1000.0], dtype=dtype)])  # beyond exp's range
    e, s, t = (torch.empty_like(x) for _ in range(3))
    suffix = native.dtype_suffix(dtype)
    getattr(library, f"activate_{suffix}")(
        *[ctypes.c_void_p(native.pointer(tensor)) for tensor in (x, e, s, t)],
        ctypes.c_int64(x.numel()),
    )
    saturated = torch.tensor([[0.0, 1.0], [-1.0, 1.0]], dtype=dtype)
    torch.testing.assert_close(torch.stack([s[-2:], t[-2:]]), saturated, rtol=0, atol=1e-30)
    x, e, s, t = x[:-2], e[:-2], s[:-2], t[:-2]
    exact = x.double()
    normal = (exact > -87) & (exact < 88)
    relative = ((e.double() - exact.exp()) / exact.exp())[normal].abs().max().item()
    sigmoid_error = (s.double() - exact.sigmoid()).abs().max().item()
    tanh_error = (t.double() - exact.tanh()).abs().max().item()
    if dtype == torch.float32:
        assert relative < 2.4e-7 and sigmoid_error < 2.5e-7 and tanh_error < 4e-7
    else:
        assert relative < 1e-15 and sigmoid_error < 1e-15 and tanh_error < 1e-15
