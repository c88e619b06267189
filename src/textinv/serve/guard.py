"""The page's HTTP guard: which requests ``textinv serve`` answers at all (issue 31).

- **Host**: on a loopback address, only requests naming this machine (``127.0.0.1``, ``localhost``, ``[::1]``) in
  their ``Host`` header. Another name there means a page elsewhere re-pointed its own name at 127.0.0.1 (DNS
  rebinding): the browser then counts it as that page's own origin, and CORS would let it drive the server.
- **Origin**: a request a browser marks with an ``Origin`` header must come from the page itself (the same scheme,
  host and port as its ``Host``). Gradio's CORS rules only hide the answer from other sites; the request (an upload,
  a click) was still carried out. Refused here, it never reaches the page.

Both refusals are a 403 with one line of text, and a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from textinv.serve.checks import is_loopback

logger = logging.getLogger(__name__)


class LocalRequestsOnly:
    """ASGI middleware: refuses a request whose ``Host`` is not this machine (when serving on loopback) or whose
    ``Origin`` is not its own ``Host``."""

    def __init__(self, app: Callable[..., Any], loopback: bool = True) -> None:
        self.app, self.loopback = app, loopback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {key.decode("latin1").lower(): value.decode("latin1") for key, value in scope["headers"]}
            host, origin = headers.get("host", ""), headers.get("origin")
            if self.loopback and not is_loopback(host_name(host)):
                logger.warning("refused a request for host %.80r (DNS rebinding?)", host)
                await _refuse(scope, send, 403, "refused: this page answers only to 127.0.0.1 and localhost")
                return
            if origin is not None and not same_origin(origin, host):
                logger.warning("refused a request to %s from another site (Origin: %.80s)", scope.get("path"), origin)
                await _refuse(scope, send, 403, "refused: this page only answers requests from itself")
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The name in a ``Host`` header without its port: ``127.0.0.1:7860`` -> ``127.0.0.1``, ``[::1]:80`` -> ``::1``."""
    host = host.strip()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_origin(origin: str, host: str) -> bool:
    """``Origin: http://127.0.0.1:7860`` sent to ``Host: 127.0.0.1:7860``: the page's own request ("null" is not)."""
    parts = urlsplit(origin.strip())
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.strip().lower()


async def _refuse(scope: dict[str, Any], send: Any, status: int, text: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = text.encode() + b"\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middleware(loopback: bool) -> list[Any]:
    """The web framework's middleware list (Gradio's ``app_kwargs``). On a public address (``--allow_remote``) the Host
    check is off: the name others reach it by is theirs to choose."""
    from starlette.middleware import Middleware

    return [Middleware(LocalRequestsOnly, loopback=loopback)]
