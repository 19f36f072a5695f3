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
from mechun.edit import localized_finetune, top_mlp_mask
from mechun.io import write_json
from mechun.localize import mlp_trace_scores
from mechun.models import Model, load_model, n_layers, save_model
from mechun.organism.world import World, relation, retain_domains
from mechun.plots import grouped_bars, layer_lines, step_lines
from mechun.report import table, write_report
from mechun.reproduce import prepare, preset_for, seeds_for
from mechun.rmu import main_setting, rmu_unlearn, save_unlearned
from mechun.stats import SeedStat

FORGET = "pathogen"
METHODS = ("rmu", "localized_ft")


def localize_forget(model: Model, world: World, n_facts: int, seed: int) -> list[float]:
    """Per-layer MLP indirect effect (causal tracing, last subject token), averaged over forget facts."""
    items = [(relation(f.relation).templates[0].format(s=f.subject), f.answer, f.subject)
             for f in world.facts_of(FORGET)[:n_facts]]
    return mlp_trace_scores(model, items, seed=seed, subjects=sorted(world.subjects))  # ROME's noise: all subjects


def localized_unlearn(model: Model, world: World, mlp_scores: list[float], n_mlps: int, steps: int, seed: int) -> dict:
    """Masked fine-tuning of the top ``n_mlps`` MLPs (in place)."""
    mask = top_mlp_mask(model, mlp_scores, n_mlps, "causal-tracing MLPs")
    forget = world.prompts(FORGET)
    retain = [(p.text, p.answer) for d in retain_domains() for p in world.prompts(d)]
    localized_finetune(model, mask, [p.text for p in forget], [p.answer for p in forget], mode="unlearn",
                       maintain=retain, lm_texts=world.filler, steps=steps, lr=1e-3, seed=seed)
    return {"components": [list(c) for c in mask.components], "n_params": mask.n_params, "steps": steps}


def unlearn_and_card(method: str, ckpt: Path, base: Model, world: World, out: Path, seed: int, how: dict[str, Any]
                     ) -> tuple[DepthCard, dict]:
    """Unlearn a fresh copy of the organism with ``method``, save it, and measure its depth card."""
    model = load_model(ckpt, device="cpu")
    ckpt_out = out / "checkpoints" / f"{method}_seed{seed}"
    steering = None
    if method == "rmu":
        res = rmu_unlearn(model, base, *how["corpora"], replace(how["rmu"], seed=seed), progress=False)
        steering = res.steering[FORGET]
        save_unlearned(model, res, ckpt_out, extra={"base_model": str(ckpt), "forget_domain": FORGET})
        made = {"layer": res.config.layer, "steering_coeff": res.config.steering_coeff, "steps": res.config.steps}
    else:
        made = localized_unlearn(model, world, how["mlp_scores"], how["n_mlps"], how["lft_steps"], seed)
        save_model(model, ckpt_out, extra_files={"edit.json": made})
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
    how: dict[str, Any] = {
        "rmu": main_setting(L, [FORGET], quick), "lft_steps": 60 if quick else 150, "n_mlps": 1 if L <= 3 else 2,
        "depth": DepthConfig(relearn_steps=(0, 5, 10) if quick else (0, 5, 10, 20, 40),
                             probe_steps=150 if quick else 300),
        "mlp_scores": localize_forget(base, world, n_facts=3 if quick else 6, seed=seed),
        "corpora": world.corpora([FORGET])}
    log(f"causal tracing (MLP, last subject token) on '{FORGET}': {[round(s, 3) for s in how['mlp_scores']]}")
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
