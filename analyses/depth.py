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
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from analyses.common import setup
from analyses.rmu_shallowness import settings as rmu_settings
from mechun.depth import DepthConfig, aggregate_cards, card_blocks, depth_card, write_card
from mechun.edit import localized_finetune, top_mlp_mask
from mechun.localize import mlp_trace_scores
from mechun.models import load_model, n_layers, save_model
from mechun.organism.train import mcq_orders_trained
from mechun.organism.world import DOMAINS, World, relation
from mechun.report import table, write_report
from mechun.rmu import rmu_unlearn, save_unlearned

FORGET = "pathogen"
METHODS = ("rmu", "localized_ft")


def localize_forget(model: Any, world: World, n_facts: int, seed: int) -> list[float]:
    """Per-layer MLP indirect effect (causal tracing, last subject token), averaged over forget facts."""
    items = [(relation(f.relation).templates[0].format(s=f.subject), f.answer, f.subject)
             for f in world.facts_of(FORGET)[:n_facts]]
    return mlp_trace_scores(model, items, seed=seed)


def localized_unlearn(model: Any, world: World, mlp_scores: list[float], n_mlps: int, steps: int, seed: int) -> dict:
    """Masked fine-tuning of the top ``n_mlps`` MLPs (in place)."""
    mask = top_mlp_mask(model, mlp_scores, n_mlps, "causal-tracing MLPs")
    forget = world.prompts(FORGET)
    retain = [(p.text, p.answer) for d, k in DOMAINS.items() if k == "retain" for p in world.prompts(d)]
    localized_finetune(model, mask, [p.text for p in forget], [p.answer for p in forget], mode="unlearn",
                       maintain=retain, lm_texts=world.filler, steps=steps, lr=1e-3, seed=seed)
    return {"components": [list(c) for c in mask.components], "n_params": mask.n_params, "steps": steps}


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None) -> dict:
    out, ckpt, world, base = setup(out, quick, seed, organism)
    L = n_layers(base)
    seeds = [seed, seed + 1, seed + 2]
    rmu_cfg, _ = rmu_settings(quick, L)
    rmu_cfg = replace(rmu_cfg, forget_domains=[FORGET])
    lft_steps = 60 if quick else 150
    n_mlps = 1 if L <= 3 else 2
    depth_cfg = DepthConfig(relearn_steps=(0, 5, 10) if quick else (0, 5, 10, 20, 40), probe_steps=150 if quick else 300)
    mlp_scores = localize_forget(base, world, n_facts=3 if quick else 6, seed=seed)
    log(f"causal tracing (MLP, last subject token) on '{FORGET}': {[round(s, 3) for s in mlp_scores]}")
    forget_texts, retain_texts = world.corpora([FORGET], mcq_per_fact=mcq_orders_trained(ckpt))
    cards: dict[str, list[dict]] = {m: [] for m in METHODS}
    made: dict[str, list[dict]] = {m: [] for m in METHODS}
    for s in seeds:
        for method in METHODS:
            model = load_model(ckpt, device="cpu")
            ckpt_out = out / "checkpoints" / f"{method}_seed{s}"
            if ckpt_out.exists():
                shutil.rmtree(ckpt_out)
            steering = None
            if method == "rmu":
                res = rmu_unlearn(model, base, forget_texts, retain_texts, replace(rmu_cfg, seed=s), progress=False)
                steering = res.steering[FORGET]
                save_unlearned(model, res, ckpt_out, extra={"base_model": str(ckpt), "forget_domain": FORGET})
                made[method].append({"layer": res.config.layer, "steering_coeff": res.config.steering_coeff,
                                     "steps": res.config.steps})
            else:
                info = localized_unlearn(model, world, mlp_scores, n_mlps, lft_steps, s)
                save_model(model, ckpt_out, extra_files={"edit.json": info})
                made[method].append(info)
            card = depth_card(base, model, world, FORGET, method=method, steering=steering,
                              relearn_copy=lambda p=ckpt_out: load_model(p, device="cpu"),
                              config=replace(depth_cfg, seed=s))
            card["models"] = {"base": str(ckpt), "unlearned": str(ckpt_out)}
            card_dir = out / "cards" / f"{method}_seed{s}"
            if card_dir.exists():
                shutil.rmtree(card_dir)
            write_card(card, card_dir)
            cards[method].append(card)
            log(f"seed {s} {method:<13} {card['verdict']['line']}")
    results: dict[str, Any] = {"methods": list(METHODS), "forget_domain": FORGET, "seeds": seeds,
                               "organism": str(ckpt), "preset": "tiny" if quick else "small",
                               "causal_tracing_mlp": mlp_scores, "unlearning": made}
    for m in METHODS:
        results[m] = aggregate_cards(cards[m])
    results["comparison"] = {m: results[m]["summary"] for m in METHODS}
    results["verdict"] = " | ".join(f"{m}: {results[m]['verdict']['line']}" for m in METHODS)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out / "report.html", f"Unlearning depth: RMU vs localized fine-tuning on '{FORGET}' "
                 f"({len(seeds)} seeds)", report_blocks(results), results=None)
    return results


def _fmt(summary: dict) -> str:
    m, sd = summary["mean"], summary["std"]
    return "nan" if math.isnan(m) else f"{m:.2f} ± {sd:.2f}"


def report_blocks(r: dict) -> list:
    keys = list(r[METHODS[0]]["summary"])
    rows = [{"measure": k, **{m: _fmt(r[m]["summary"][k]) for m in METHODS}} for k in keys]
    blocks: list = [
        "<p>Each method unlearned the <b>" + r["forget_domain"] + f"</b> domain of one organism "
        f"({r['preset']} preset), once per seed {r['seeds']}. Every number is mean ± std over the seeds; the per-seed "
        "cards are in <code>cards/</code>. The verdict lines below are computed from the seed-mean card.</p>",
        *[f"<p class='verdict'><b>{m}</b>: {r[m]['verdict']['line']}</p>" for m in METHODS],
        ("h2", "Comparison"), table(rows),
    ]
    bars = go.Figure()
    show = ["forget train", "forget paraphrase", "forget mcq", "junk recovery", "relearn regained (peak)",
            "retain acc. static", "retain acc. dynamic"]
    for m in METHODS:
        bars.add_bar(name=m, x=show, y=[r[m]["summary"][k]["mean"] for k in show],
                     error_y=dict(type="data", array=[r[m]["summary"][k]["std"] for k in show]))
    bars.update_layout(barmode="group", title="Headline numbers (mean ± std over seeds)", template="plotly_white")
    blocks.append(bars)
    for title, path, y in (("Probe accuracy on held-out subjects (unlearned model)", ("probes", "unlearned", "accuracy"),
                            "accuracy"),
                           ("CKA(base, unlearned) on forget prompts", ("cka", "forget"), "CKA"),
                           ("CKA(base, unlearned) on retain prompts", ("cka", "retain"), "CKA"),
                           ("Norm ratio unlearned / base on forget prompts", ("junk", "norm_ratio_forget"), "ratio")):
        fig = go.Figure()
        for m in METHODS:
            v = r[m]
            for k in path:
                v = v[k]
            fig.add_scatter(x=list(range(len(v))), y=v, name=m, mode="lines+markers")
        if path[0] == "probes":
            base = r[METHODS[0]]["probes"]["base"]["accuracy"]
            fig.add_scatter(x=list(range(len(base))), y=base, name="base", mode="lines+markers",
                            line=dict(dash="dash"))
        fig.update_layout(title=title + " (seed mean)", xaxis_title="layer", yaxis_title=y, template="plotly_white")
        blocks.append(fig)
    relearn = go.Figure()
    for m in METHODS:
        rl = r[m]["relearning"]
        relearn.add_scatter(x=rl["steps"], y=rl["held_out_accuracy"], name=f"{m}: held-out facts", mode="lines+markers")
    relearn.update_layout(title="Relearning attack: held-out forget facts vs steps (seed mean)", xaxis_title="steps",
                          yaxis_title="accuracy", template="plotly_white")
    blocks.append(relearn)
    for m in METHODS:
        blocks += card_blocks(r[m], heading=f"{m}: seed-mean depth card")
    blocks.append(("h2", "How each model was made"))
    blocks.append("<pre>" + json.dumps(r["unlearning"], indent=1) + "</pre>")
    return blocks


if __name__ == "__main__":
    from analyses.common import script_main

    script_main(run, __doc__)
