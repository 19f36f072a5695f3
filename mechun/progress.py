"""Progress bars and dependency noise.

mechun's own progress bars are widgets in Jupyter (when ipywidgets is installed: the ``notebook`` extra) and text
bars in a terminal -- never tqdm's "IProgress not found" warning. :func:`quiet_dependencies` silences what other
libraries print while mechun drives them (transformers' "Loading weights" / "Writing model shards" bars and its
info-level chatter); warnings that point at a real mistake are not silenced but avoided at the source (mechun passes
attention masks and names the loss).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["in_notebook", "progress_bar", "quiet_dependencies"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython ``ZMQInteractiveShell``), False in a terminal or a script."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _widgets_available() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(*args: Any, **kwargs: Any):
    """A tqdm bar: a widget in Jupyter with ipywidgets, a text bar otherwise (same arguments as ``tqdm``)."""
    if kwargs.get("disable"):
        from tqdm.std import tqdm
    elif in_notebook() and _widgets_available():
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(*args, **kwargs)


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Inside: transformers and huggingface_hub log errors only and show no progress bars; both are restored on
    exit (a user's own settings stay theirs)."""
    import transformers
    from transformers.utils import logging as tlog

    verbosity = tlog.get_verbosity()
    bars_on = tlog.is_progress_bar_enabled()
    hub = None
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        hub = (are_progress_bars_disabled(), disable_progress_bars, enable_progress_bars)
    transformers.logging.set_verbosity_error()
    tlog.disable_progress_bar()
    if hub is not None:
        hub[1]()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars_on:
            tlog.enable_progress_bar()
        if hub is not None and not hub[0]:
            hub[2]()
