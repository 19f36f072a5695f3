"""Depth benchmark: which measure tells knowledge removed from knowledge hidden?

1. The organism and its retain oracle (same world, seed and schedule, never shown the forget domain's subjects).
2. Every unlearning method of :mod:`mechun.unlearn` at three strengths x the seeds: unlearn ``pathogen``.
3. Per checkpoint, every depth measure (:data:`mechun.depth.benchmark.MEASURES`: behaviour, 1 - UDS, held-out
   probes, CKA, junk recovery, logit lens, norm ratio), then the ground truth: relearn half the forget facts and
   measure the other half, against the oracle relearned the same way (:func:`relearn_advantage`).
4. Score every measure against the ground truth (AUC with a bootstrap interval, Spearman, leave-one-method-out) and
   rank them; UDS's sanity values (oracle as the unlearned model: 1; the full model: 0).

Run as ``mechun reproduce depth-benchmark --out DIR [--quick] [--seed N]``. The unlearned checkpoints are not kept
(each is relearned in place once measured).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mechun.depth.benchmark import (
    MEASURES,
    checkpoint_measures,
    relearn_advantage,
    relearn_curve,
    score_measures,
)
from mechun.depth.uds import unlearning_depth_score
from mechun.errors import MechunError
from mechun.evaluate import evaluate_world, retain_accuracy
from mechun.io import write_json
from mechun.models import load_model, n_layers
from mechun.organism.train import cached_organism
from mechun.organism.world import retain_domains
from mechun.plots import grouped_bars
from mechun.report import table, write_report
from mechun.reproduce import prepare, preset_for, seeds_for
from mechun.stats import SeedStat, over_seeds
from mechun.unlearn import (
    METHODS,
    GradAscentConfig,
    GradDiffConfig,
    LocalizedFTConfig,
    NPOConfig,
    SimNPOConfig,
    UnlearnData,
    unlearn,
)
from mechun.unlearn.rmu import main_setting

FORGET = "pathogen"
#: Relearning advantage over the oracle that counts as "knowledge still there" (reported as a count; the AUC label is
#: the median split, :func:`mechun.depth.benchmark.score_measures`).
THRESHOLD = 0.1


def strengths(quick: bool, layers: int) -> dict[str, list[tuple[str, Any]]]:
    """Three strengths per method (two with ``quick``), weakest first.

    Calibrated on the main organism (seed 0, unlearning seed 0; forget / retain trained-template accuracy after
    the strongest setting, base 1.00 / 0.999): gradient ascent at lr 1e-4 falls off a cliff between 25 steps
    (0.41 / 0.95) and 30 (0.10 / 0.86); gradient difference between 30 steps (0.24 / 0.96) and 40 (0.00 / 0.80);
    NPO with the retain term at 5x (lr 3e-4, 40 steps) 0.15 / 0.98; SimNPO (lr 3e-4, 80 steps) 0.12 / 0.99;
    localized FT (two MLPs, 20 steps) 0.00 / 0.96; RMU's main setting 0.00 / 0.99. So every method but gradient
    ascent and gradient difference forgets at its strongest setting with retain >= 0.95x base; those two cannot
    at this learning rate (their forget and retain accuracy fall together). The tiny organism (``quick``) has 12
    forget passages and needs higher rates (as in ``tests/test_unlearn.py``)."""
    rmu = main_setting(layers, [FORGET], quick)
    lft = LocalizedFTConfig(n_mlps=1 if layers <= 3 else 2)
    if quick:
        grid = {"grad_ascent": [GradAscentConfig(lr=1e-3, steps=k) for k in (10, 30)],
                "grad_diff": [GradDiffConfig(lr=1e-3, steps=k) for k in (20, 60)],
                "npo": [NPOConfig(lr=1e-3, beta=b) for b in (0.1, 0.01)],
                "simnpo": [SimNPOConfig(lr=1e-3, beta=b) for b in (2.5, 0.5)],
                "rmu": [replace(rmu, steps=k) for k in (40, 120)],
                "localized_ft": [replace(lft, steps=k) for k in (40, 120)]}
    else:
        grid = {"grad_ascent": [GradAscentConfig(lr=1e-4, steps=k) for k in (20, 25, 30)],
                "grad_diff": [GradDiffConfig(lr=1e-4, steps=k) for k in (20, 30, 40)],
                "npo": [NPOConfig(lr=3e-4, alpha=5.0, steps=k) for k in (10, 20, 40)],
                "simnpo": [SimNPOConfig(lr=3e-4, steps=k) for k in (20, 40, 80)],
                "rmu": [replace(rmu, steps=k) for k in (50, 100, 150)],
                "localized_ft": [replace(lft, steps=k) for k in (5, 10, 20)]}
    return {m: [(_label(c), c) for c in cs] for m, cs in grid.items()}


def _label(cfg: Any) -> str:
    beta = f", beta {cfg.beta:g}" if hasattr(cfg, "beta") else ""
    return f"{cfg.steps} steps{beta}"


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None,
        methods: tuple[str, ...] | None = None, oracle: str | Path | None = None) -> dict:
    """The whole benchmark; ``quick``: the tiny organism, one seed, two strengths; ``methods`` limits the methods
    (e.g. for a test). ``organism`` and ``oracle`` (its retain oracle without ``pathogen``) go together; without
    them both come from the per-machine cache (trained on first use)."""
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:  # before any work
        raise MechunError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if (organism is None) != (oracle is None):
        raise MechunError("pass both organism and its retain oracle, or neither (both then come from the cache)")
    t0 = time.time()
    out, ckpt, world, base = prepare(out, quick, seed, organism)
    oracle_dir = Path(oracle) if oracle is not None else cached_organism(preset_for(quick), seed, without=FORGET)
    oracle = load_model(oracle_dir, device="cpu")
    data = UnlearnData.from_world(world, FORGET)
    seeds = seeds_for(seed, quick)[:1] if quick else seeds_for(seed, quick)
    settings = strengths(quick, n_layers(base))
    if methods is not None:
        settings = {m: settings[m] for m in methods}
    steps = (0, 5, 10) if quick else (0, 5, 10, 20)
    probe_steps = 100 if quick else 200
    oracle_curves = {s: relearn_curve(load_model(oracle_dir, device="cpu"), world, FORGET, steps, seed=s)
                     for s in seeds}
    log(f"oracle relearning (held-out forget facts, {steps[-1]} steps): "
        f"{[round(c[-1], 3) for c in oracle_curves.values()]}")
    base_acc = evaluate_world(base, world, formats=("train",))
    rows: list[dict[str, Any]] = []
    for s in seeds:
        for method, levels in settings.items():
            for label, cfg in levels:
                model = load_model(ckpt, device="cpu")
                unlearn(model, replace(cfg, seed=s), data, reference=base)
                measured = checkpoint_measures(base, model, oracle, world, FORGET, probe_steps, seed=s)
                retain = retain_accuracy(evaluate_world(model, world, retain_domains(), formats=("train",)))
                row: dict[str, Any] = {"method": method, "setting": label, "seed": s,
                                       "forget": measured["forget_accuracy"], "retain": retain["train"], **measured}
                curve = relearn_curve(model, world, FORGET, steps, seed=s)  # in place: the checkpoint's last use
                row.update(relearn_curve=curve, advantage=relearn_advantage(curve, oracle_curves[s]))
                rows.append(row)
                log(f"seed {s} {method:<12} {label:<10} forget {row['forget']:.2f} retain {row['retain']:.2f} "
                    f"advantage {row['advantage']:+.2f} 1-UDS {row['uds']:.2f} ({time.time() - t0:.0f} s)")
    prompts = world.prompts(FORGET)[:: len(world.prompts(FORGET)) // len(world.facts_of(FORGET))]
    p, a = [x.text for x in prompts], [x.answer for x in prompts]
    sanity = {"oracle": unlearning_depth_score(base, oracle, oracle, p, a).score,
              "full": unlearning_depth_score(base, oracle, base, p, a).score}
    measures = score_measures(rows, list(MEASURES), seed=seed)
    ranking = sorted(measures, key=lambda m: -1.0 if math.isnan(measures[m]["auc"]) else -measures[m]["auc"])
    by_method = {m: {k: over_seeds([r for r in rows if r["method"] == m], lambda r, k=k: r[k])
                     for k in ("forget", "retain", "advantage", *MEASURES)} for m in settings}
    results: dict[str, Any] = {
        "methods": list(settings), "measures": measures, "ranking": ranking, "uds_sanity": sanity,
        "n_checkpoints": len(rows), "threshold": THRESHOLD,
        "label_threshold": measures[next(iter(measures))]["threshold"],
        "n_knowledge_left": sum(r["advantage"] > THRESHOLD for r in rows), "relearn_steps": list(steps), "seeds": seeds,
        "forget_domain": FORGET, "preset": preset_for(quick), "organism": str(ckpt), "oracle": str(oracle_dir),
        "base_accuracy": base_acc, "oracle_relearn": {str(s): c for s, c in oracle_curves.items()},
        "measure_definitions": MEASURES, "rows": rows, "seconds": round(time.time() - t0, 1),
        "by_method": {m: {k: {"mean": v.mean, "std": v.std} for k, v in d.items()} for m, d in by_method.items()},
    }
    results["verdict"] = verdict(results)
    write_json(out / "results.json", results)
    write_report(out / "report.html", f"Depth benchmark: which measure tells removed from hidden? "
                 f"({len(rows)} checkpoints)", report_blocks(results, by_method), results=None)
    return results


def verdict(r: dict) -> str:
    top = r["ranking"][0]
    m, u = r["measures"][top], r["measures"]["uds"]
    beats = "UDS is the most faithful measure" if top == "uds" else (
        f"{top} ({m['auc']:.2f}, interval {m['auc_ci'][0]:.2f}-{m['auc_ci'][1]:.2f}) ranks above UDS "
        f"({u['auc']:.2f}, {u['auc_ci'][0]:.2f}-{u['auc_ci'][1]:.2f})"
        + (" but the intervals overlap" if m["auc_ci"][0] <= u["auc_ci"][1] else ""))
    return (f"Over {r['n_checkpoints']} checkpoints ({r['n_knowledge_left']} relearn more than {r['threshold']:g} "
            f"beyond the retain oracle; AUC label: advantage above the median, {r['label_threshold']:.2f}): {beats}.")


def report_blocks(r: dict, by_method: dict[str, dict[str, SeedStat]]) -> list:
    board = [{"measure": m, "what": r["measure_definitions"][m], "AUC": r["measures"][m]["auc"],
              "AUC 95% interval": "{:.2f} - {:.2f}".format(*r["measures"][m]["auc_ci"]),
              "Spearman": r["measures"][m]["spearman"],
              "worst AUC, one method left out": r["measures"][m]["auc_worst_leave_one_out"]} for m in r["ranking"]]
    methods = [{"method": m, **{k: f"{v.mean:.2f} ± {v.std:.2f}" for k, v in d.items()}} for m, d in by_method.items()]
    bars = grouped_bars(r["ranking"], {"AUC": [r["measures"][m]["auc"] for m in r["ranking"]]},
                        "Faithfulness of each measure to oracle-relative relearning (AUC)", "AUC", y_range=(0, 1.05))
    return [
        f"<p class='verdict'>{r['verdict']}</p>",
        f"<p>Forget domain <b>{r['forget_domain']}</b>; seeds {r['seeds']}; ground truth: held-out forget accuracy "
        f"over {r['relearn_steps']} relearning steps on the other half, largest gap to the retain oracle; "
        f"{r['n_knowledge_left']} of {r['n_checkpoints']} checkpoints exceed {r['threshold']:g}; AUC label: above "
        f"the median advantage ({r['label_threshold']:.2f}). UDS sanity: oracle as unlearned "
        f"{r['uds_sanity']['oracle']:.3f}, full model "
        f"{r['uds_sanity']['full']:.3f}. Every measure points the same way: higher claims more knowledge left.</p>",
        ("h2", "Measures ranked by faithfulness"), table(board), bars,
        ("h2", "Methods (mean ± std over strengths and seeds)"), table(methods),
        ("h2", "Every checkpoint"),
        table([{k: v for k, v in x.items() if k != "relearn_curve"} for x in r["rows"]]),
    ]


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
