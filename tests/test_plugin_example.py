"""The README's worked plugin example, installed the way a user installs it, then run."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO, fwlab_env, only_run_dir, run_fwlab

EXAMPLE = REPO / "examples" / "fwlab-elman"


def test_the_readme_shows_the_example_verbatim():
    readme = (REPO / "README.md").read_text()
    assert (EXAMPLE / "fwlab_elman.py").read_text().strip() in readme
    assert (EXAMPLE / "pyproject.toml").read_text().split("[tool.setuptools]")[0].strip() in readme


def test_the_installed_example_is_listed_and_trains(tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    env = fwlab_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])

    listed = run_fwlab("list", "cell", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "elman" in listed.stdout and "Elman (tanh) RNN" in listed.stdout

    fit = run_fwlab(
        "fit",
        "--model",
        "elman",
        "--data",
        "retrieval",
        "model.hidden_size=16",
        "data.train_size=500",
        "data.val_size=100",
        "data.test_size=100",
        "trainer.max_steps=5",
        "logger=none",
        cwd=tmp_path,
        env=env,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert "recurrent_init_scale" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))

    # the plugin's own bound (bounded(1.0, above=0.0)) stops a run before anything is written
    refused = run_fwlab("fit", "--model", "elman", "--data", "retrieval",
                        "model.recurrent_init_scale=0", "output_dir=refused", cwd=tmp_path,
                        env=env)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = "bad value for 'model.recurrent_init_scale' (from the command line): must be above 0"
    assert message in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
