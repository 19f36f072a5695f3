"""What every analysis script shares: its command line (``python -m analyses.NAME --out DIR [--quick]``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def script_main(run: Callable[..., dict], doc: str | None) -> None:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny organism, short settings")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = run(a.out, quick=a.quick, seed=a.seed, log=lambda m: print(m, file=sys.stderr))
    print(results.get("verdict", f"wrote {a.out}/results.json"))
