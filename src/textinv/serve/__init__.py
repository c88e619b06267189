"""``textinv serve``: a local web page to train a token, watch it learn, download it and generate with it.

The page (:mod:`.page`, Gradio) is a thin layer over plain classes a test can drive without a browser:
:class:`~textinv.serve.state.ServerState` (one training job at a time, exports, generation),
:class:`~textinv.serve.jobs.TrainingJob` (a :func:`textinv.training.train` call in a thread) and
:mod:`.uploads` (what a browser sends); :mod:`.words` lays out a job of several words (``--concepts``). Training, formats and generation are the very functions the CLI
calls; nothing here trains or writes a file format of its own. :mod:`.server` starts it all.

The page can start work on this machine and read model folders on it, so it listens on the loopback
address unless ``--allow_remote`` says otherwise (:mod:`.checks`); analytics and share tunnels are off.
"""

from __future__ import annotations

from textinv.serve.server import ServeOptions, serve

__all__ = ["ServeOptions", "serve"]
