"""RMU is mostly shallow: reproduce Arditi & Chughtai (2024) end to end on the model organism.

1. Train (or reuse) the organism; unlearn one forget domain with RMU, once per seed.
2. Diagnose the junk: norm ratio unlearned/base by layer on forget vs retain prompts; candidate directions and their
   cosine with the steering vector.
3. Recovery: project the mean-difference direction (computed at the RMU layer) out of the residual stream at every
   layer from the RMU layer on; forget accuracy in every format for base / unlearned / ablated, with controls (a
   random direction of the same norm; the same ablation on the base model), retain accuracy, and coherence.
4. Depth: sweep RMU strength (steering coefficient, layer, steps, alpha) over the same seeds and report how much the
   ablation recovers at each setting -- partial recovery marks knowledge removed more deeply than by junk alone.

Run as ``mechun reproduce rmu-shallow --out DIR [--quick] [--seed N]`` or ``python -m analyses.rmu_shallowness``.
Writes ``DIR/results.json``, ``DIR/report.html`` and the checkpoints (``DIR/organism``, ``DIR/rmu_seed*``).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

import mechun
from analyses.common import setup
from mechun.evaluate import FORMATS, chance_accuracy, continuation_nll, evaluate_world, next_token_entropy
from mechun.models import load_model, n_layers
from mechun.organism.train import mcq_orders_trained
from mechun.organism.world import DOMAINS, World
from mechun.report import table, write_report
from mechun.rmu import (
    RMUConfig,
    diagnose_junk,
    random_direction_like,
    recovery_fraction,
    rmu_unlearn,
    save_unlearned,
)

FORGET = "pathogen"
CONDITIONS = ("base", "unlearned", "ablated", "random_ablated", "base_ablated")


def settings(quick: bool, layers: int) -> tuple[RMUConfig, list[tuple[str, RMUConfig]]]:
    """The main RMU setting and the strength sweep. The main setting (c = 5x the mean forget-token norm, 250 steps,
    alpha 100, lr 1e-3, batch 16) forgets the trained formats to chance while keeping retain accuracy; the sweep
    varies c, the layer and the number of steps around it (fewer steps, to fit the time budget)."""
    layer = max(1, layers // 2 - 1)
    main = RMUConfig([FORGET], layer=layer, steps=120 if quick else 250, alpha=100.0, lr=1e-3, auto_coeff_mult=5.0,
                     batch_size=16)
    short = replace(main, steps=60 if quick else 120)
    sweep = [(f"{short.steps} steps", short),
             (f"{short.steps} steps, c=10x norm", replace(short, auto_coeff_mult=10.0)),
             (f"{short.steps} steps, layer {min(layers - 1, layer + 1)}", replace(short, layer=min(layers - 1, layer + 1)))]
    return main, sweep


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def _retain_acc(acc: dict[str, dict[str, float]]) -> dict[str, float]:
    retain = [d for d, kind in DOMAINS.items() if kind == "retain"]
    return {f: statistics.fmean(acc[d][f] for d in retain) for f in FORMATS}


def one_seed(ckpt: Path, world: World, cfg: RMUConfig, out: Path | None, full: bool, base: Any) -> dict:
    """Unlearn with ``cfg``, diagnose, ablate, evaluate. ``full`` adds controls, coherence and the diagnosis."""
    model = load_model(ckpt, device="cpu")
    forget_texts, retain_texts = world.corpora(cfg.forget_domains, mcq_per_fact=mcq_orders_trained(ckpt))
    res = rmu_unlearn(model, base, forget_texts, retain_texts, cfg, progress=False)
    layer = res.config.layer
    forget_prompts = [p.text for p in world.prompts(FORGET)]
    retain_prompts = [p.text for d, k in DOMAINS.items() if k == "retain" for p in world.prompts(d)]
    diag = diagnose_junk(base, model, forget_prompts, retain_prompts, steering=res.steering[FORGET])
    direction = diag.direction(layer, "mean_diff")
    after = range(layer, n_layers(model))
    acc: dict[str, dict] = {"unlearned": evaluate_world(model, world)}
    with mechun.project_out(model, direction, layers=after):
        acc["ablated"] = evaluate_world(model, world)
        coh_ablated = continuation_nll(model, base, forget_prompts) if full else None
        ent_ablated = next_token_entropy(model, forget_prompts) if full else None
    row: dict[str, Any] = {"seed": cfg.seed, "rmu_layer": layer, "steering_coeff": res.config.steering_coeff,
                           "norm_ratio_forget_at_layer": diag.norm_ratio_forget[layer],
                           "norm_ratio_retain_at_layer": diag.norm_ratio_retain[layer]}
    if full:
        rand = random_direction_like(direction.vector, seed=cfg.seed + 1000)
        with mechun.project_out(model, rand, layers=after):
            acc["random_ablated"] = evaluate_world(model, world)
        with mechun.project_out(base, direction.vector, layers=after):
            acc["base_ablated"] = evaluate_world(base, world)
        row.update(
            norm_ratio_forget=diag.norm_ratio_forget, norm_ratio_retain=diag.norm_ratio_retain,
            cos=diag.cos_with_steering, explained=diag.explained,
            coherence={"unlearned": continuation_nll(model, base, forget_prompts), "ablated": coh_ablated},
            entropy={"unlearned": next_token_entropy(model, forget_prompts), "ablated": ent_ablated},
        )
        if out is not None:
            ckpt_out = out / f"rmu_seed{cfg.seed}"
            if ckpt_out.exists():
                shutil.rmtree(ckpt_out)
            save_unlearned(model, res, ckpt_out, extra={"base_model": str(ckpt), "forget_domain": FORGET})
            direction.save(out / f"junk_direction_seed{cfg.seed}.safetensors")
            row["checkpoint"] = str(ckpt_out)
    row["accuracy"] = acc
    return row


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None,
        sweep: bool = True) -> dict:
    """The whole analysis. ``organism`` reuses an existing checkpoint dir; ``sweep=False`` skips the depth sweep."""
    out, ckpt, world, base = setup(out, quick, seed, organism)
    preset = "tiny" if quick else "small"
    base_acc = evaluate_world(base, world)
    forget_prompts = [p.text for p in world.prompts(FORGET)]
    base_coherence = continuation_nll(base, base, forget_prompts)  # the same for every seed: computed once
    base_entropy = next_token_entropy(base, forget_prompts)
    seeds = [seed, seed + 1, seed + 2]
    main, sweep_settings = settings(quick, n_layers(base))
    if not sweep:
        sweep_settings = []

    log(f"RMU on '{FORGET}' at layer {main.layer}, seeds {seeds}")
    rows = []
    for s in seeds:
        rows.append(one_seed(ckpt, world, replace(main, seed=s), out, True, base))
        log(f"  seed {s}: forget train acc {rows[-1]['accuracy']['unlearned'][FORGET]['train']:.2f} -> ablated "
            f"{rows[-1]['accuracy']['ablated'][FORGET]['train']:.2f}")
    for r in rows:
        r["accuracy"]["base"] = base_acc
        r["coherence"]["base"], r["entropy"]["base"] = base_coherence, base_entropy

    def agg(fn) -> tuple[float, float]:
        return _mean_std([fn(r) for r in rows])

    results: dict[str, Any] = {"forget_domain": FORGET, "rmu_layer": main.layer, "seeds": seeds,
                               "config": {"main": asdict(main), "preset": preset, "quick": quick},
                               "checkpoints": {"base": str(ckpt), "unlearned": [r["checkpoint"] for r in rows]}}
    # headline accuracies: the trained cloze templates; every format below
    for name, pick in (("forget_accuracy", lambda a, f: a[FORGET][f]), ("retain_accuracy", lambda a, f: _retain_acc(a)[f])):
        results[name], results[name + "_std"], by_fmt = {}, {}, {}
        for cond in CONDITIONS:
            m, sd = agg(lambda r, c=cond, p=pick: p(r["accuracy"][c], "train"))
            results[name][cond], results[name + "_std"][cond] = m, sd
        for fmt in FORMATS:
            by_fmt[fmt] = {cond: agg(lambda r, c=cond, f=fmt, p=pick: p(r["accuracy"][c], f))[0] for cond in CONDITIONS}
        results[name + "_by_format"] = by_fmt
    results["chance"] = {f: chance_accuracy(f) for f in FORMATS}
    nl = n_layers(base)
    results["norm_ratio_forget"] = [agg(lambda r, i=i: r["norm_ratio_forget"][i])[0] for i in range(nl)]
    results["norm_ratio_retain"] = [agg(lambda r, i=i: r["norm_ratio_retain"][i])[0] for i in range(nl)]
    results["cos_direction_steering"] = [agg(lambda r, i=i: r["cos"]["mean_diff"][i])[0] for i in range(nl)]
    results["cos_by_candidate"] = {k: [agg(lambda r, i=i, k=k: r["cos"][k][i])[0] for i in range(nl)]
                                   for k in rows[0]["cos"]}
    results["explained_by_candidate"] = {k: [agg(lambda r, i=i, k=k: r["explained"][k][i])[0] for i in range(nl)]
                                         for k in rows[0]["explained"]}

    def rec(r, cond, fmt):
        a = r["accuracy"]
        return recovery_fraction(a["base"][FORGET][fmt], a["unlearned"][FORGET][fmt], a[cond][FORGET][fmt])

    results["recovery_fraction"], results["recovery_fraction_std"] = agg(lambda r: rec(r, "ablated", "train"))
    results["control_recovery_fraction"], results["control_recovery_fraction_std"] = agg(
        lambda r: rec(r, "random_ablated", "train"))
    results["recovery_fraction_by_format"] = {f: agg(lambda r, f=f: rec(r, "ablated", f))[0] for f in FORMATS}
    results["recovery_fraction_per_seed"] = [rec(r, "ablated", "train") for r in rows]
    results["coherence_nll"] = {k: agg(lambda r, k=k: r["coherence"][k])[0] for k in ("base", "unlearned", "ablated")}
    results["next_token_entropy"] = {k: agg(lambda r, k=k: r["entropy"][k])[0] for k in ("base", "unlearned", "ablated")}
    results["steering_coeff"] = [r["steering_coeff"] for r in rows]
    results["per_seed"] = [{k: v for k, v in r.items() if k not in ("cos", "explained")} for r in rows]

    log(f"depth sweep: {len(sweep_settings)} settings x {len(seeds)} seeds")
    sweep_rows = [{"setting": f"main ({main.steps} steps)", "rmu": asdict(main), **_sweep_summary(rows)}]
    for label, cfg in sweep_settings:
        srows = [one_seed(ckpt, world, replace(cfg, seed=s), None, False, base) for s in seeds]
        for r in srows:
            r["accuracy"]["base"] = base_acc
        sweep_rows.append({"setting": label, "rmu": asdict(cfg), **_sweep_summary(srows)})
        log(f"  {label}: recovery {sweep_rows[-1]['recovery_fraction']:.2f}")
    results["sweep"] = sweep_rows
    results["partial_recovery_settings"] = [
        s["setting"] for s in sweep_rows
        if s["forget_unlearned"] <= chance_accuracy("train") + 0.1 and s["recovery_fraction"] < 0.7]
    results["verdict"] = verdict(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out / "report.html", "RMU is mostly shallow: junk-direction diagnosis on the model organism",
                 report_blocks(results), results=results)
    return results


def _sweep_summary(rows: list[dict]) -> dict:
    def acc(r, cond, dom_fn):
        return dom_fn(r["accuracy"][cond])

    forget = lambda a: a[FORGET]["train"]  # noqa: E731
    retain = lambda a: _retain_acc(a)["train"]  # noqa: E731
    recs = [recovery_fraction(forget(r["accuracy"]["base"]), forget(r["accuracy"]["unlearned"]),
                              forget(r["accuracy"]["ablated"])) for r in rows]
    rec_m, rec_s = _mean_std(recs)
    return {
        "steering_coeff": statistics.fmean(r["steering_coeff"] for r in rows),
        "norm_ratio_forget": statistics.fmean(r["norm_ratio_forget_at_layer"] for r in rows),
        "forget_unlearned": statistics.fmean(acc(r, "unlearned", forget) for r in rows),
        "forget_ablated": statistics.fmean(acc(r, "ablated", forget) for r in rows),
        "retain_unlearned": statistics.fmean(acc(r, "unlearned", retain) for r in rows),
        "recovery_fraction": rec_m, "recovery_fraction_std": rec_s, "recovery_per_seed": recs,
    }


def verdict(r: dict) -> str:
    rec = r["recovery_fraction"]
    if math.isnan(rec):
        return "RMU did not lower forget accuracy, so there is nothing to recover."
    depth = "mostly shallow" if rec >= 0.7 else ("partly shallow" if rec >= 0.3 else "mostly deep")
    partial = r["partial_recovery_settings"]
    tail = (f" Settings with only partial recovery (< 0.7) despite forgetting: {', '.join(partial)}." if partial
            else " No swept setting gave partial recovery while forgetting.")
    return (f"RMU here is {depth}: projecting one direction out restores {rec:.0%} of the forgotten cloze accuracy "
            f"(random-direction control {r['control_recovery_fraction']:.0%}); the direction's |cos| with the "
            f"steering vector at the RMU layer is {r['cos_direction_steering'][r['rmu_layer']]:.2f}.{tail}")


def report_blocks(r: dict) -> list:
    layers = list(range(len(r["norm_ratio_forget"])))
    norm = go.Figure([go.Scatter(x=layers, y=r["norm_ratio_forget"], name="forget prompts", mode="lines+markers"),
                      go.Scatter(x=layers, y=r["norm_ratio_retain"], name="retain prompts", mode="lines+markers")])
    norm.add_vline(x=r["rmu_layer"], line_dash="dot", annotation_text="RMU layer")
    norm.update_layout(title="Residual norm ratio, unlearned / base, by layer", xaxis_title="layer",
                       yaxis_title="norm ratio", template="plotly_white")
    cos = go.Figure([go.Scatter(x=layers, y=v, name=k, mode="lines+markers") for k, v in r["cos_by_candidate"].items()])
    cos.update_layout(title="Cosine of candidate junk directions with the steering vector u", xaxis_title="layer",
                      yaxis_title="cos", template="plotly_white")
    bars = go.Figure()
    for cond in CONDITIONS:
        vals = [r["forget_accuracy_by_format"][f][cond] for f in FORMATS] + [r["retain_accuracy_by_format"][f][cond]
                                                                            for f in FORMATS]
        bars.add_bar(name=cond, x=[f"forget {f}" for f in FORMATS] + [f"retain {f}" for f in FORMATS], y=vals)
    bars.update_layout(barmode="group", title="Accuracy by condition and format (mean over seeds)",
                       yaxis=dict(range=[0, 1.05], title="accuracy"), template="plotly_white")
    sweep = go.Figure(go.Scatter(
        x=[s["setting"] for s in r["sweep"]], y=[s["recovery_fraction"] for s in r["sweep"]],
        error_y=dict(type="data", array=[s["recovery_fraction_std"] for s in r["sweep"]]), mode="markers",
        marker=dict(size=12), name="recovery"))
    sweep.add_bar(x=[s["setting"] for s in r["sweep"]], y=[s["forget_unlearned"] for s in r["sweep"]],
                  name="forget acc. after RMU", opacity=0.4)
    sweep.update_layout(title="Recovery by the junk-direction ablation vs RMU strength (mean ± std over seeds)",
                        yaxis_title="recovery fraction / accuracy", template="plotly_white")
    acc_rows = [{"format": f, **{c: r["forget_accuracy_by_format"][f][c] for c in CONDITIONS}} for f in FORMATS]
    sweep_rows = [{k: s[k] for k in ("setting", "steering_coeff", "norm_ratio_forget", "forget_unlearned",
                                     "forget_ablated", "retain_unlearned", "recovery_fraction",
                                     "recovery_fraction_std")} for s in r["sweep"]]
    return [
        f"<p class='verdict'>{r['verdict']}</p>",
        "<p>Forget domain: <b>" + r["forget_domain"] + f"</b>; RMU layer {r['rmu_layer']}; seeds {r['seeds']}. "
        "Ablation projects the mean unlearned-minus-base direction (at the RMU layer, forget tokens) out of the "
        "residual stream at every layer from the RMU layer on. Recovery fraction = (ablated − unlearned) / "
        "(base − unlearned) on the trained cloze templates.</p>",
        ("h2", "Forget-domain accuracy (mean over seeds)"), table(acc_rows),
        bars, norm, cos,
        ("h2", "Depth: RMU strength sweep"), table(sweep_rows), sweep,
        ("h2", "Coherence of forget-prompt continuations"),
        table([{"condition": k, "NLL under base model": v, "next-token entropy": r["next_token_entropy"][k]}
               for k, v in r["coherence_nll"].items()]),
    ]


if __name__ == "__main__":
    from analyses.common import script_main

    script_main(run, __doc__)
