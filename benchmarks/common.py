"""What the benchmark scripts share: the organism they measure on, set up as the analyses set it up."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mechun.reproduce import prepare


def organism(path: str | None) -> tuple[Path, Any, Any, tempfile.TemporaryDirectory | None]:
    """The checkpoint, its world and the model on CPU (:func:`mechun.reproduce.prepare`): ``path`` if given,
    otherwise the tiny organism trained into a temporary dir (returned last, to clean up; else None)."""
    tmp = None if path is not None else tempfile.TemporaryDirectory()
    _, ckpt, world, model = prepare(tmp.name if tmp is not None else path, quick=True, seed=0, organism=path)
    return ckpt, world, model, tmp
