"""``option()``: a dataclass field that carries its help text and choices, the one place an option is defined.

TrainConfig's fields (textinv.config) and its training-data base (textinv.data.options) are declared with it;
textinv.flags makes a flag of every such field and TrainConfig.validate checks ``choices`` from here too.
Imports nothing of textinv (and no torch), so both option modules can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Optional[tuple[str, ...]] = None,
    default_factory: Any = dataclasses.MISSING,
    repr: bool = True,
    kw_only: bool = False,
) -> Any:
    """A field with ``help`` and ``choices`` in its metadata (``kw_only`` for a base class's fields)."""
    metadata = {"help": help, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, repr=repr, metadata=metadata, kw_only=kw_only)
    return field(default=default, repr=repr, metadata=metadata, kw_only=kw_only)
