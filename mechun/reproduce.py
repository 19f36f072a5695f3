"""``mechun reproduce NAME``: run one of the analysis scripts in the checkout's ``analyses/`` end to end.

The library never imports the analyses (they compose the library, not the other way round), and they are not an
installed package: ``analyses`` is too generic a top-level name to put on a user's ``sys.path``. ``reproduce`` loads
the script by file path from the source checkout that this ``mechun`` was installed from (``pip install -e .``, as
``make`` does). An installation without the checkout says so.

What every analysis shares lives here too: :func:`prepare` (output dir, organism, world, base model) and
:func:`script_main` (the ``python analyses/NAME.py --out DIR [--quick] [--seed N]`` command line).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mechun.errors import MechunError

#: ``mechun reproduce`` names and the script each runs (``analyses/{script}.py``).
ANALYSES = {"organism": "organism_baseline", "rmu-shallow": "rmu_shallowness",
            "localized-editing": "localized_editing", "sae-unlearning": "sae_unlearning",
            "depth": "depth", "edit-specificity": "edit_specificity", "restore": "restore",
            "depth-benchmark": "depth_benchmark"}


def analyses_dir() -> Path:
    """The ``analyses/`` folder of the source checkout beside the ``mechun`` package."""
    return Path(__file__).resolve().parents[1] / "analyses"


def load_analysis(name: str) -> ModuleType:
    """The analysis script for a ``mechun reproduce`` name, imported from its file."""
    if name not in ANALYSES:
        raise MechunError(f"unknown analysis {name!r}; choose one of {sorted(ANALYSES)}")
    path = analyses_dir() / f"{ANALYSES[name]}.py"
    if not path.is_file():
        raise MechunError(f"no {path}: `mechun reproduce` runs the scripts of a source checkout; clone the "
                          "repository and `pip install -e .` it (or run `make reproduce` there)")
    module_name = f"mechun_analysis_{ANALYSES[name]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def reproduce(name: str, out: str | Path, quick: bool = False, seed: int = 0, overwrite: bool = False,
              sweep: bool = True) -> Path:
    """Run analysis ``name`` into the output dir ``out`` (:func:`mechun.io.run_dir`: a new or empty dir, or with
    ``overwrite`` an earlier mechun output; a failed run leaves ``out`` as it was). ``sweep=False`` skips the
    strength sweep of an analysis that has one (rmu-shallow: ``make reproduce`` runs its headline only)."""
    import inspect

    from mechun.io import run_dir

    module = load_analysis(name)
    options: dict[str, Any] = {}
    if not sweep:
        with_sweep = [n for n in ANALYSES if "sweep" in inspect.signature(load_analysis(n).run).parameters]
        if "sweep" not in inspect.signature(module.run).parameters:
            raise MechunError(f"{name} has no sweep to skip; --no-sweep applies to {', '.join(with_sweep)}")
        options["sweep"] = False
    with run_dir(out, f"mechun reproduce {name}", overwrite) as d:
        module.run(d, quick=quick, seed=seed, **options)
    return Path(out)


def seeds_for(seed: int, quick: bool, n: int = 3) -> list[int]:
    """The seeds an analysis repeats its measurement over: ``n`` consecutive ones from ``seed``, two with
    ``--quick`` (enough for the mean-and-std code path; quick runs are smoke tests, not results)."""
    return [seed + i for i in range(2 if quick else n)]


def preset_for(quick: bool) -> str:
    """The organism preset an analysis runs on: ``tiny`` with ``--quick``, else ``main``."""
    return "tiny" if quick else "main"


def prepare(out: str | Path, quick: bool, seed: int, organism: str | Path | None) -> tuple[Path, Path, Any, Any]:
    """The output dir (created), the organism checkpoint (``organism`` if given, else the per-machine cached one
    of :func:`preset_for` and ``seed``, trained on first use), its world and the base model."""
    from mechun.models import load_model
    from mechun.organism.train import cached_organism
    from mechun.organism.world import World

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(organism) if organism is not None else cached_organism(preset_for(quick), seed)
    return out, ckpt, World.load(ckpt), load_model(ckpt, device="cpu")


def script_main(run: Callable[..., dict], doc: str | None) -> None:
    """The command line of an analysis script run directly: ``--out DIR [--quick] [--seed N] [--overwrite]``,
    with the output-dir rules of ``mechun reproduce``."""
    from mechun.io import run_dir

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny organism, short settings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier mechun output in --out")
    a = ap.parse_args()
    with run_dir(a.out, f"analysis {Path(sys.argv[0]).stem}", a.overwrite) as d:
        results = run(d, quick=a.quick, seed=a.seed, log=lambda m: print(m, file=sys.stderr))
    print(results.get("verdict", f"wrote {a.out}/results.json"))
