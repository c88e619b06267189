"""Reading a text file the user named on the command line (a concepts file, a template file): UTF-8 (a byte-order
mark from a Windows editor is fine), and every way it can fail is one line naming the flag, the path and the fix.
Imports nothing of textinv but its errors, so the torch-free option modules can use it."""

from __future__ import annotations

from pathlib import Path

from textinv.errors import UserError, first_line


def read_user_text(path: str, flag: str, expected: str) -> str:
    """The text of ``path``, given with ``flag``; ``expected`` says what to give instead (``a text file of ...``)."""
    try:
        return Path(path).expanduser().read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{flag} {path!r} does not exist; give {expected}") from None
    except IsADirectoryError:
        raise UserError(f"{flag} {path!r} is a folder; give {expected}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {path!r} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{flag} {path!r} cannot be read: {first_line(error)}") from None
