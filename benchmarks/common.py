"""What the benchmark scripts share: the organism they measure on."""

from __future__ import annotations

import os
import tempfile

from mechun.organism.train import train_organism


def organism_dir(path: str | None) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """``path`` if given; otherwise the tiny organism, trained into a temporary dir (returned, to clean up)."""
    if path is not None:
        return path, None
    tmp = tempfile.TemporaryDirectory()
    return str(train_organism(os.path.join(tmp.name, "org"), "tiny", seed=0, progress=False)), tmp
