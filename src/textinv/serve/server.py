"""Starting ``textinv serve``: options, Gradio's quiet launch settings, SIGTERM as Ctrl-C, and :func:`serve`.

The page and the state behind it are imported inside :func:`serve`, after the checks: a missing web extra or a
refused host is one line, said before the page, the training code or Gradio are loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from textinv.config import UserError
from textinv.serve.checks import (
    check_host,
    check_model_folder,
    check_port,
    check_port_free,
    is_loopback,
    port_in_use_text,
)
from textinv.serve.guard import middleware

if TYPE_CHECKING:
    from textinv.serve.state import ServerState

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def check_web_extra() -> None:
    """Gradio comes with the optional ``web`` extra: without it, say how to install it (not a ModuleNotFoundError)."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError("textinv serve needs Gradio, which is not installed: pip install 'textinv[web]'")


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: Optional[str] = None
    allow_remote: bool = False
    work_dir: Optional[str] = None


def quiet_web_framework(work_dir: Path) -> None:
    """Before Gradio is imported: no analytics or version checks, uploads cached in the server's folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(work_dir / "gradio-uploads"))


def launch_options(options: ServeOptions, state: ServerState) -> dict[str, Any]:
    """Gradio's launch() arguments: no share tunnel, no run history, monitoring or MCP; uploads capped."""
    return dict(
        server_name=options.host,
        server_port=options.port,
        share=False,
        inbrowser=False,
        show_error=False,  # failures are shown as one line by the handlers themselves
        max_file_size=state.limits.max_request_bytes,
        allowed_paths=[str(state.downloads_dir)],
        enable_monitoring=False,
        run_history=False,
        mcp_server=False,
        pwa=False,
        ssr_mode=False,
        footer_links=[],
        quiet=True,  # its banner suggests share=True; serve() logs the address itself
        # Only requests from the page itself, to this machine's name: no other site, no DNS rebinding (serve/guard.py).
        app_kwargs={"middleware": middleware(is_loopback(options.host))},
    )


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, ``docker stop``) ends the server as Ctrl-C does: a running job checkpoints first."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def serve(options: ServeOptions) -> None:
    """Check the options, build the page and serve it until interrupted (then stop a running job cleanly)."""
    check_web_extra()
    check_host(options.host, options.allow_remote)
    check_port(options.port)
    check_port_free(options.host, options.port)  # before the work folder, the page and Gradio: nothing left behind
    default_model = check_model_folder(options.model) if options.model else None
    from textinv.serve.page import build_app
    from textinv.serve.state import ServerState

    work_dir = (
        Path(options.work_dir).expanduser() if options.work_dir else Path(tempfile.mkdtemp(prefix="textinv-serve-"))
    )
    own_work_dir = not options.work_dir  # a temporary folder of ours: removed again if the server cannot start
    state = ServerState(work_dir, default_model)
    state.downloads_dir.mkdir(parents=True, exist_ok=True)
    quiet_web_framework(state.work_dir)
    app = build_app(state)
    logger.info("work folder (uploads, runs, downloads): %s", state.work_dir)
    state.default_model()  # the tiny pipeline is built now, not on the first click
    shown_host = f"[{options.host}]" if ":" in options.host else options.host
    logger.info(
        "serving http://%s:%d/ (Ctrl-C stops it; a running training is stopped with a checkpoint)",
        shown_host,
        options.port,
    )
    _stop_on_sigterm()
    try:
        app.launch(**launch_options(options, state))
    except OSError as error:  # the port was taken after check_port_free (Gradio's message names launch())
        if own_work_dir:
            shutil.rmtree(state.work_dir, ignore_errors=True)
        if re.search(r"port|address", str(error), re.IGNORECASE):
            raise UserError(port_in_use_text(options.host, options.port)) from None
        raise
    finally:
        state.shutdown()
