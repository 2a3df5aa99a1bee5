"""Shared helpers: running the real `fwlab` command in a subprocess, on CPU, offline."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

# Without a GPU, Triton's fused kernels run in its CPU interpreter, so the tests check them
# against the PyTorch reference anyway. Read when a kernel module is imported: set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def fwlab_env(home: Path) -> dict[str, str]:
    """An environment with no W&B credentials and no network use, and a quiet progress bar."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(home),  # no ~/.netrc with W&B credentials
        WANDB_SILENT="true",
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore",
    )
    env.pop("FWLAB_PLUGINS", None)
    env.pop("TRITON_INTERPRET", None)  # a user's run: kernels only where they run natively
    return env


def run_fwlab(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run ``python -m fwlab ARGS`` and return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "fwlab", *args],
        cwd=cwd,
        env=env or fwlab_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def autograd_node_names(tensor: torch.Tensor, depth: int = 3) -> set[str]:
    """The class names of the autograd nodes that made ``tensor``, ``depth`` levels deep: a
    cell's outputs may be a view of its sequence node's result."""
    names, nodes = set(), [tensor.grad_fn]
    for _ in range(depth):
        names |= {type(node).__name__ for node in nodes if node is not None}
        nodes = [parent for n in nodes if n is not None for parent, _ in n.next_functions]
    return names


def made_by(tensor: torch.Tensor, node: str, depth: int = 3) -> bool:
    """Whether autograd made ``tensor`` with the custom Function ``node`` (its class name)."""
    return f"{node}Backward" in autograd_node_names(tensor, depth)


def on_threads(threads: int, run: Callable[[], T]) -> T:
    """``run()`` with ``threads`` of torch's intra-op threads (and so a C kernel's), the number
    restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def write_executable(path: Path, text: str) -> None:
    """A small script (a fake ``sbatch`` or ``scontrol`` on PATH)."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def only_run_dir(root: Path) -> Path:
    runs = sorted(p for p in (root / "runs").iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
