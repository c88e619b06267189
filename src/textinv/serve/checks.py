"""What ``textinv serve`` refuses before it listens or trains: a host others can reach, a bad or busy port, a model
folder that is not a pipeline. Each refusal is a one-line :class:`textinv.config.UserError`."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any, Optional

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


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something else listens on, before the work folder, the page or Gradio exist: one line naming
    the port and a free one to pass to --port instead."""
    address = _listen_address(host, port)
    error = _bind_error(address)
    if error is None:
        return
    if error.errno == errno.EADDRINUSE:
        later = range(port + 1, min(port + 50, 65535) + 1)
        raise UserError(
            port_in_use_text(host, port, next((p for p in later if _bind_error(_moved(address, p)) is None), None))
        )
    raise UserError(f"cannot listen on {host} port {port} ({error.strerror}); choose another --port or --host")


def port_in_use_text(host: str, port: int, free: Optional[int] = None) -> str:
    """``port 7860 on 127.0.0.1 is in use; choose another with --port 7861`` (``free``: a port found free)."""
    return f"port {port} on {host} is in use; choose another with --port{'' if free is None else f' {free}'}"


def _listen_address(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(address family, socket address) the server listens on for ``host``."""
    try:
        infos = socket.getaddrinfo(host.strip().strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(
            f"--host {host} cannot be resolved ({error.strerror}); give an address such as 127.0.0.1"
        ) from None
    family, _, _, _, address = infos[0]
    return family, address


def _moved(address: tuple[int, tuple[Any, ...]], port: int) -> tuple[int, tuple[Any, ...]]:
    family, where = address
    return family, (where[0], port, *where[2:])


def _bind_error(address: tuple[int, tuple[Any, ...]]) -> Optional[OSError]:
    """None if a server could listen there now (bound as Gradio's server binds: SO_REUSEADDR), else the error."""
    family, where = address
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as error:
            return error
    return None


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
