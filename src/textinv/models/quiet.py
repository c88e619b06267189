"""Library chatter while textinv loads or saves models: transformers' and diffusers' loading bars and info lines.

textinv draws its own progress bar and says what it loaded in one line; the libraries' "Loading weights",
"Loading pipeline components", "Writing model shards" bars and their import-time notices (such as
transformers' "requires torchvision" fallbacks) would scatter over it. :func:`quiet_loading` keeps both
libraries at error level with their bars off for the duration, then restores what they were. When a
library's verbosity is already info or lower (``textinv --verbose`` sets that), it is left alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    quieted: list[tuple[Any, int, bool]] = []
    for library in (transformers_logging, diffusers_logging):
        verbosity = library.get_verbosity()
        if verbosity <= logging.INFO:
            continue  # the user asked for the chatter
        quieted.append((library, verbosity, library.is_progress_bar_enabled()))
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, verbosity, bars in quieted:
            library.set_verbosity(verbosity)
            if bars:
                library.enable_progress_bar()
