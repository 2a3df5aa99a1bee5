"""Run directories: one per run, never shared, never overwritten."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from fwlab.errors import ConfigError

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


def create_run_dir(output_dir: str | Path, *parts: str) -> Path:
    """A new directory ``<output_dir>/<date>_<time>_<parts>_<random>``.

    ``mkdir`` without ``exist_ok`` is atomic: two runs started at the same moment get different
    random suffixes, and should they ever draw the same one, the second tries again. A folder
    that cannot be made (no permission, a read-only or missing mount) is a :class:`ConfigError`
    naming ``output_dir``.
    """
    root = Path(output_dir)
    stem = "_".join([time.strftime("%Y%m%d-%H%M%S"), *(_safe(p) for p in parts if p)])
    try:
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = root / f"{stem}_{secrets.token_hex(3)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise ConfigError(
            f"output_dir={output_dir}: cannot make a run directory there ({error.strerror})"
        ) from None
    raise RuntimeError(f"could not create a fresh run directory under {root}")


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", part)


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory or of a checkpoint inside one."""
    path = Path(path)
    if path.is_file() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    return path
