"""How a failure reaches the page: one line, never a traceback (those go to the server's log)."""

from __future__ import annotations

import logging

from textinv.config import UserError, first_line

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 400


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Whitespace (newlines included) folded to single spaces, cut to ``limit`` characters."""
    folded = " ".join(str(text).split())
    return folded if len(folded) <= limit else folded[: limit - 3] + "..."


def render_error(error: BaseException) -> str:
    """What the page shows for a failure: one line. Unexpected ones are logged with their traceback."""
    if isinstance(error, UserError):
        return one_line("error: " + str(error))
    logger.error("internal error in the web page", exc_info=error)
    return one_line(f"internal error: {type(error).__name__}: {first_line(error)} (the server log has the details)")
