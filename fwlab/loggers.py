"""Metric loggers: W&B (online when it can be, offline run files otherwise), CSV, or none."""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import string
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from fwlab.config import LoggerConfig
from fwlab.errors import ConfigError

WANDB_ID_FILE = "wandb_run_id"
WANDB_DEFAULT_HOST = "https://api.wandb.ai"
OFFLINE_MODES = {"offline", "dryrun", "disabled"}


def wandb_credentials_exist(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(host).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_server_answers(host: str, timeout: float = 2.0) -> bool:
    url = urlparse(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_mode(mode: str) -> None:
    if mode not in ("auto", "online", "offline"):
        raise ConfigError(f"logger.mode='{mode}' is not auto, online or offline")


def wandb_online(mode: str) -> bool:
    """Whether to log online. ``WANDB_MODE=offline|disabled`` always wins; ``auto`` goes online
    only with credentials and a server that answers within two seconds, so a run never waits
    on the network."""
    check_mode(mode)
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES or mode == "offline":
        return False
    if mode == "online":
        return True
    host = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_HOST)
    return wandb_credentials_exist(host) and wandb_server_answers(host)


def check_logger(config: LoggerConfig) -> None:
    """Raise :class:`ConfigError`, before the run directory exists, for a W&B logger asked to
    log online (``logger.mode=online``) with no credentials: W&B would refuse it once the run's
    files were written."""
    if config.name != "wandb":
        return
    check_mode(config.mode)
    # online only: wandb_online("auto") would probe the server, which make_logger does, once
    if config.mode != "online" or not wandb_online("online"):
        return
    host = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_HOST)
    if not wandb_credentials_exist(host):
        raise ConfigError(
            f"logger.mode=online: no W&B API key for {host} here (run `wandb login`, or set "
            "WANDB_API_KEY); logger.mode=auto writes offline run files without one"
        )


def make_logger(config: LoggerConfig, run_dir: Path, run_name: str) -> Logger | None:
    """The logger for a run writing into ``run_dir``; W&B reuses the run id stored there, so a
    resumed run continues the same W&B run."""
    if config.name == "none":
        return None
    if config.name == "csv":
        # csv/version_<n>/metrics.csv: a resumed run gets the next version, since Lightning
        # deletes an existing metrics.csv in the directory it is given.
        return CSVLogger(save_dir=run_dir, name="csv")
    if config.name != "wandb":
        raise ConfigError(f"logger.name='{config.name}' is not wandb, csv or none")
    id_file = run_dir / WANDB_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        # a W&B sweep agent names the run it starts; otherwise a fresh id in W&B's alphabet
        alphabet = string.ascii_lowercase + string.digits
        run_id = os.environ.get("WANDB_RUN_ID") or "".join(
            secrets.choice(alphabet) for _ in range(8)
        )
        id_file.write_text(run_id + "\n")
    online = wandb_online(config.mode)
    if not online and os.environ.get("WANDB_MODE", "").lower() != "disabled":
        os.environ["WANDB_MODE"] = "offline"
    extra: dict[str, Any] = {"entity": config.entity} if config.entity else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WandbLogger(
            name=run_name,
            project=config.project,
            save_dir=str(run_dir),
            id=run_id,
            offline=not online,
            resume="allow",
            **extra,
        )
