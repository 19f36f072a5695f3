"""What every analysis script shares: its command line (``python -m analyses.NAME --out DIR [--quick]``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def script_main(run: Callable[..., dict], doc: str | None) -> None:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny organism, short settings")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = run(a.out, quick=a.quick, seed=a.seed, log=lambda m: print(m, file=sys.stderr))
    print(results.get("verdict", f"wrote {a.out}/results.json"))


def setup(out: str | Path, quick: bool, seed: int, organism: str | Path | None) -> tuple[Path, Path, Any, Any]:
    """The output dir (created), the organism checkpoint (``organism`` if given, else trained or reused in
    ``out/organism``: tiny with ``quick``, small otherwise), its world and the base model."""
    from mechun.models import load_model
    from mechun.organism.train import ensure_organism
    from mechun.organism.world import World

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(organism) if organism is not None else ensure_organism(out / "organism", "tiny" if quick else "small",
                                                                      seed)
    return out, ckpt, World.load(ckpt), load_model(ckpt, device="cpu")
