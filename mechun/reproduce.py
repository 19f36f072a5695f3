"""``mechun reproduce NAME``: run one of the analyses in ``analyses/`` end to end."""

from __future__ import annotations

import importlib
from pathlib import Path

from mechun.errors import MechunError

ANALYSES = {"organism": "analyses.organism_baseline", "rmu-shallow": "analyses.rmu_shallowness",
            "localized-editing": "analyses.localized_editing", "sae-unlearning": "analyses.sae_unlearning",
            "depth": "analyses.depth", "edit-specificity": "analyses.edit_specificity", "restore": "analyses.restore"}


def reproduce(name: str, out: Path, quick: bool = False, seed: int = 0) -> Path:
    if name not in ANALYSES:
        raise MechunError(f"unknown analysis {name!r}; choose one of {sorted(ANALYSES)}")
    importlib.import_module(ANALYSES[name]).run(Path(out), quick=quick, seed=seed)
    return Path(out)
