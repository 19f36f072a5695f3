"""Depth cards for RMU and localized fine-tuning on one organism and domain, over three seeds, side by side.

1. Train (or reuse) the organism.
2. Per seed: unlearn the ``pathogen`` domain with RMU (the main setting of the RMU-is-shallow analysis) and with
   localized fine-tuning (only the MLPs that causal tracing ranks highest for the forget facts, at the last subject
   token; ``-log(1-p)`` forget loss, maintain loss on the retain facts, LM loss on filler). Save both checkpoints.
3. Per seed and method: the full depth card (:mod:`mechun.depth`) -- behaviour in every format, junk-direction
   recovery, held-out-subject probes, relearning, CKA, specificity -- written to ``cards/{method}_seed{s}/``.
4. Aggregate over seeds (mean ± std) and compare the methods in one report.

Run as ``mechun reproduce depth --out DIR [--quick] [--seed N]``. ``DIR/results.json`` maps each method to its
card's JSON (the seed-mean card, with ``summary`` mean/std/per-seed headline numbers and the ``per_seed`` cards).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from mechun.depth import (
    DepthCard,
    DepthConfig,
    SeedMeanCard,
    aggregate_cards,
    card_blocks,
    depth_card,
    write_card,
)
from mechun.edit import top_mlp_mask
from mechun.io import write_json
from mechun.models import Model, load_model, n_layers
from mechun.organism.world import World
from mechun.plots import grouped_bars, layer_lines, step_lines
from mechun.report import table, write_report
from mechun.reproduce import prepare, preset_for, seeds_for
from mechun.stats import SeedStat
from mechun.unlearn import LocalizedFTConfig, UnlearnData, localize_forget, save_unlearned_model, unlearn
from mechun.unlearn.rmu import main_setting

FORGET = "pathogen"
METHODS = ("rmu", "localized_ft")


def unlearn_and_card(method: str, ckpt: Path, base: Model, world: World, out: Path, seed: int, how: dict[str, Any]
                     ) -> tuple[DepthCard, dict]:
    """Unlearn a fresh copy of the organism with ``method``, save it, and measure its depth card."""
    model = load_model(ckpt, device="cpu")
    ckpt_out = out / "checkpoints" / f"{method}_seed{seed}"
    steering = None
    res = unlearn(model, replace(how[method], seed=seed), how["data"], reference=base)
    save_unlearned_model(model, res, ckpt_out, extra={"base_model": str(ckpt), "forget_domain": FORGET})
    if method == "rmu":
        steering = res.rmu.steering[FORGET]
        made = {"layer": res.config.layer, "steering_coeff": res.config.steering_coeff, "steps": res.config.steps}
    else:
        made = {"components": res.details["components"], "n_params": res.details["n_params"],
                "steps": res.config.steps}
    card = depth_card(base, model, world, FORGET, method=method, steering=steering,
                      relearn_copy=lambda: load_model(ckpt_out, device="cpu"), config=replace(how["depth"], seed=seed))
    card.models = {"base": str(ckpt), "unlearned": str(ckpt_out)}
    write_card(card, out / "cards" / f"{method}_seed{seed}")
    return card, made


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None) -> dict:
    for sub in ("checkpoints", "cards"):  # refuse before any work: never replace earlier results
        if (Path(out) / sub).exists() and any((Path(out) / sub).iterdir()):
            raise FileExistsError(f"{Path(out) / sub} already holds results; choose a new --out")
    out, ckpt, world, base = prepare(out, quick, seed, organism)
    L = n_layers(base)
    seeds = seeds_for(seed, quick)
    data = UnlearnData.from_world(world, FORGET)
    mlp_scores = localize_forget(base, data.localize_items, n_facts=3 if quick else 6, seed=seed,
                                 subjects=data.subjects)  # once, on the base model: every seed trains these MLPs
    mask = top_mlp_mask(base, mlp_scores, 1 if L <= 3 else 2, "causal-tracing MLPs")
    how: dict[str, Any] = {
        "rmu": main_setting(L, [FORGET], quick),
        "localized_ft": LocalizedFTConfig(steps=60 if quick else 150, components=mask.components),
        "depth": DepthConfig(relearn_steps=(0, 5) if quick else (0, 5, 10, 20, 40),
                             probe_steps=100 if quick else 300),
        "mlp_scores": mlp_scores, "data": data}
    log(f"causal tracing (MLP, last subject token) on '{FORGET}': {[round(s, 3) for s in mlp_scores]}")
    cards: dict[str, list[DepthCard]] = {m: [] for m in METHODS}
    made: dict[str, list[dict]] = {m: [] for m in METHODS}
    for s in seeds:
        for method in METHODS:
            card, info = unlearn_and_card(method, ckpt, base, world, out, s, how)
            cards[method].append(card)
            made[method].append(info)
            log(f"seed {s} {method:<13} {card.verdict.line}")
    agg = {m: aggregate_cards(cards[m]) for m in METHODS}
    results: dict[str, Any] = {"methods": list(METHODS), "forget_domain": FORGET, "seeds": seeds,
                               "organism": str(ckpt), "preset": preset_for(quick),
                               "causal_tracing_mlp": how["mlp_scores"], "unlearning": made}
    results.update({m: agg[m].to_json() for m in METHODS})
    results["comparison"] = {m: agg[m].summary for m in METHODS}
    results["verdict"] = " | ".join(f"{m}: {agg[m].mean.verdict.line}" for m in METHODS)
    write_json(out / "results.json", results)
    write_report(out / "report.html", f"Unlearning depth: RMU vs localized fine-tuning on '{FORGET}' "
                 f"({len(seeds)} seeds)", report_blocks(results, agg), results=None)
    return results


def _stat(summary: dict) -> SeedStat:
    return SeedStat(summary["mean"], summary["std"], tuple(summary["per_seed"]))


def report_blocks(r: dict, agg: dict[str, SeedMeanCard]) -> list:
    keys = list(agg[METHODS[0]].summary)
    rows = [{"measure": k, **{m: format(_stat(agg[m].summary[k])) for m in METHODS}} for k in keys]
    show = ["forget train", "forget paraphrase", "forget mcq", "junk recovery", "relearn regained (peak)",
            "retain acc. static", "retain acc. dynamic"]
    mean = {m: agg[m].mean for m in METHODS}
    probe_series = {m: c.probes.unlearned["accuracy"] for m, c in mean.items()}
    probe_series["base"] = mean[METHODS[0]].probes.base["accuracy"]
    blocks: list = [
        "<p>Each method unlearned the <b>" + r["forget_domain"] + f"</b> domain of one organism "
        f"({r['preset']} preset), once per seed {r['seeds']}. Every number is mean ± std over the seeds; the per-seed "
        "cards are in <code>cards/</code>. The verdict lines below are computed from the seed-mean card.</p>",
        *[f"<p class='verdict'><b>{m}</b>: {mean[m].verdict.line}</p>" for m in METHODS],
        ("h2", "Comparison"), table(rows),
        grouped_bars(show, {m: [_stat(agg[m].summary[k]) for k in show] for m in METHODS},
                     "Headline numbers (mean ± std over seeds)", ""),
        layer_lines(probe_series, "Probe accuracy on held-out subjects (seed mean)", "accuracy", dashed=["base"]),
        layer_lines({m: c.cka.forget for m, c in mean.items()}, "CKA(base, unlearned) on forget prompts (seed mean)",
                    "CKA"),
        layer_lines({m: c.cka.retain for m, c in mean.items()}, "CKA(base, unlearned) on retain prompts (seed mean)",
                    "CKA"),
        layer_lines({m: c.junk.norm_ratio_forget for m, c in mean.items()},
                    "Norm ratio unlearned / base on forget prompts (seed mean)", "ratio"),
        step_lines(mean[METHODS[0]].relearning.steps,
                   {f"{m}: held-out facts": c.relearning.held_out_accuracy for m, c in mean.items()},
                   "Relearning attack: held-out forget facts vs steps (seed mean)", "accuracy", x_title="steps"),
    ]
    for m in METHODS:
        blocks += card_blocks(agg[m], heading=f"{m}: seed-mean depth card")
    blocks.append(("h2", "How each model was made"))
    blocks.append("<pre>" + json.dumps(r["unlearning"], indent=1) + "</pre>")
    return blocks


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
