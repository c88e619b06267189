"""What ``textinv serve`` refuses before it listens or trains: a host others can reach, a bad port, a model folder
that is not a pipeline. Each refusal is a one-line :class:`textinv.config.UserError`."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from textinv.config import UserError

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless asked for explicitly; warn when it is."""
    if not host or not host.strip():
        raise UserError("--host is empty; give an address such as 127.0.0.1")
    if is_loopback(host):
        return
    if not allow_remote:
        raise UserError(
            f"--host {host} is reachable from other machines, and the page can start training and read model "
            "folders here; pass --allow_remote as well if that is what you want"
        )
    logger.warning(
        "warning: serving on %s: anyone who can reach this address can train, read model folders and use the CPU/GPU "
        "(there is no login); prefer 127.0.0.1 with an SSH tunnel",
        host,
    )


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} must be between 1 and 65535")


def check_model_folder(text: str) -> Path:
    """A local diffusers pipeline folder, or a one-line UserError (a hub id is never downloaded here)."""
    from textinv.models.loading import check_pipeline_dir

    shown = text.strip()
    path = Path(shown).expanduser()
    if not path.exists():
        raise UserError(
            f"model folder {shown!r} does not exist; give a local diffusers pipeline folder (with model_index.json), "
            "or leave the field empty for the tiny demo model"
        )
    if not path.is_dir():
        raise UserError(f"model {shown!r} is a file; give a diffusers pipeline folder (with model_index.json)")
    check_pipeline_dir(path)  # one line naming what is missing or unsupported
    return path.resolve()
