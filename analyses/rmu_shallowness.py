"""Is RMU shallow? Reproduce the junk-direction diagnosis of Arditi & Chughtai (2024) end to end on the model organism.

1. Train (or reuse) the organism; unlearn one forget domain with RMU, once per seed.
2. Diagnose the junk: norm ratio unlearned/base by layer on forget vs retain prompts; candidate directions and their
   cosine with the steering vector.
3. Recovery: project the mean-difference direction (computed at the RMU layer) out of the residual stream at every
   layer from the RMU layer on; forget accuracy in every format for base / unlearned / ablated, with controls (a
   random direction of the same norm; the same ablation on the base model), retain accuracy, and coherence.
4. Depth: sweep RMU strength (steering coefficient, layer, steps, alpha) over the same seeds and report how much the
   ablation recovers at each setting -- partial recovery marks knowledge removed more deeply than by junk alone.

Run as ``mechun reproduce rmu-shallow --out DIR [--quick] [--seed N]`` or ``python analyses/rmu_shallowness.py``.
Writes ``DIR/results.json``, ``DIR/report.html`` and the unlearned checkpoints (``DIR/rmu_seed*``); the organism
comes from the per-machine cache (:func:`mechun.organism.train.cached_organism`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mechun.evaluate import (
    FORMATS,
    chance_accuracy,
    continuation_nll,
    evaluate_world,
    next_token_entropy,
    retain_accuracy,
)
from mechun.io import write_json
from mechun.junk import JunkRecovery, diagnose_junk, junk_recovery
from mechun.models import Model, load_model, n_layers
from mechun.organism.world import World, retain_domains
from mechun.plots import grouped_bars, layer_lines
from mechun.report import table, write_report
from mechun.reproduce import prepare, preset_for, seeds_for
from mechun.stats import SeedStat, over_seeds
from mechun.unlearn.rmu import RMUConfig, main_setting, rmu_unlearn, save_unlearned

FORGET = "pathogen"
#: RMU seeds per run (two with --quick). The main setting was chosen on other seeds (see mechun.unlearn.rmu.main_setting).
N_SEEDS = 5
CONDITIONS = ("base", "unlearned", "ablated", "random_ablated", "base_ablated")


def settings(quick: bool, layers: int) -> tuple[RMUConfig, list[tuple[str, RMUConfig]]]:
    """The main RMU setting (:func:`mechun.unlearn.rmu.main_setting`) and the strength sweep around it, at half its steps
    (to fit the time budget): as is, c = 10x the norm, one layer later."""
    main = main_setting(layers, [FORGET], quick)
    short = replace(main, steps=main.steps // 2)
    sweep = [(f"{short.steps} steps", short),
             (f"{short.steps} steps, c=10x norm", replace(short, auto_coeff_mult=10.0)),
             (f"{short.steps} steps, layer {min(layers - 1, main.layer + 1)}",
              replace(short, layer=min(layers - 1, main.layer + 1)))]
    return main, sweep


def one_per_fact(world: World, domain: str) -> list[str]:
    """One trained-template prompt per fact of ``domain`` (the first of :attr:`Relation.eval_indices`): enough for
    a mean over prompts (coherence, entropy, retain norms) at a quarter of the cost of all four."""
    return [p.text for p in world.prompts(domain)[::len(world.prompts(domain)) // len(world.facts_of(domain))]]


def retain_prompts(world: World) -> list[str]:
    return [t for d in retain_domains() for t in one_per_fact(world, d)]


def one_seed(ckpt: Path, world: World, cfg: RMUConfig, out: Path | None, full: bool, base: Model,
             base_acc: dict) -> dict:
    """Unlearn with ``cfg``, diagnose, ablate, evaluate. ``full`` adds the controls, coherence and the diagnosis and
    measures every format; otherwise only the trained templates (all a sweep row reports)."""
    model = load_model(ckpt, device="cpu")
    forget_texts, retain_texts = world.corpora(cfg.forget_domains)
    res = rmu_unlearn(model, base, forget_texts, retain_texts, cfg, progress=False)
    layer = res.config.layer
    forget_prompts = [p.text for p in world.prompts(FORGET)]
    diag = diagnose_junk(base, model, forget_prompts, retain_prompts(world), steering=res.steering[FORGET])

    def score(formats):
        return lambda m: evaluate_world(m, world, formats=formats)

    rec: JunkRecovery = junk_recovery(base, model, diag, score(FORMATS if full else ("train",)), forget=FORGET,
                                      layer=layer, controls=("random", "base") if full else (),
                                      control_score=score(("train",)), before={"base": base_acc}, seed=cfg.seed)
    row: dict[str, Any] = {"seed": cfg.seed, "rmu_layer": layer, "steering_coeff": res.config.steering_coeff,
                           "norm_ratio_forget_at_layer": diag.norm_ratio_forget[layer],
                           "norm_ratio_retain_at_layer": diag.norm_ratio_retain[layer]}
    if full:
        few = one_per_fact(world, FORGET)
        with rec.ablation(model):
            coherence, entropy = continuation_nll(model, base, few), next_token_entropy(model, few)
        row.update(
            norm_ratio_forget=diag.norm_ratio_forget, norm_ratio_retain=diag.norm_ratio_retain,
            cos=diag.cos_with_steering, explained=diag.explained,
            coherence={"unlearned": continuation_nll(model, base, few), "ablated": coherence},
            entropy={"unlearned": next_token_entropy(model, few), "ablated": entropy},
        )
        if out is not None:
            ckpt_out = out / f"rmu_seed{cfg.seed}"
            save_unlearned(model, res, ckpt_out, extra={"base_model": str(ckpt), "forget_domain": FORGET})
            rec.direction.save(out / f"junk_direction_seed{cfg.seed}.safetensors")
            row["checkpoint"] = str(ckpt_out)
    row["accuracy"] = dict(rec.scores)
    row["recovery"] = rec.recovery_by_format
    row["control_recovery"] = rec.control_recovery if full else None
    return row


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None,
        sweep: bool = True) -> dict:
    """The whole analysis. ``organism`` reuses an existing checkpoint dir; ``sweep=False`` skips the depth sweep."""
    seeds = seeds_for(seed, quick, N_SEEDS)
    taken = [Path(out) / f"rmu_seed{s}" for s in seeds if (Path(out) / f"rmu_seed{s}").exists()]
    if taken:  # refuse before any work: never replace earlier results
        raise FileExistsError(f"{taken[0]} already exists; choose a new --out")
    out, ckpt, world, base = prepare(out, quick, seed, organism)
    base_acc = evaluate_world(base, world)
    few = one_per_fact(world, FORGET)
    base_coherence = continuation_nll(base, base, few)  # the same for every seed: computed once
    base_entropy = next_token_entropy(base, few)
    main, sweep_settings = settings(quick, n_layers(base))
    if not sweep:
        sweep_settings = []

    log(f"RMU on '{FORGET}' at layer {main.layer}, seeds {seeds}")
    rows = []
    for s in seeds:
        rows.append(one_seed(ckpt, world, replace(main, seed=s), out, True, base, base_acc))
        rows[-1]["coherence"]["base"], rows[-1]["entropy"]["base"] = base_coherence, base_entropy
        log(f"  seed {s}: forget train acc {rows[-1]['accuracy']['unlearned'][FORGET]['train']:.2f} -> ablated "
            f"{rows[-1]['accuracy']['ablated'][FORGET]['train']:.2f}")
    results: dict[str, Any] = {"forget_domain": FORGET, "rmu_layer": main.layer, "seeds": seeds,
                               "config": {"main": asdict(main), "preset": preset_for(quick), "quick": quick},
                               "checkpoints": {"base": str(ckpt), "unlearned": [r["checkpoint"] for r in rows]}}
    results.update(_aggregate(rows, n_layers(base)))

    log(f"depth sweep: {len(sweep_settings)} settings x {len(seeds)} seeds")
    sweep_rows = [{"setting": f"main ({main.steps} steps)", "rmu": asdict(main), **_sweep_summary(rows)}]
    for label, cfg in sweep_settings:
        srows = [one_seed(ckpt, world, replace(cfg, seed=s), None, False, base, base_acc) for s in seeds]
        sweep_rows.append({"setting": label, "rmu": asdict(cfg), **_sweep_summary(srows)})
        log(f"  {label}: recovery {sweep_rows[-1]['recovery_fraction']:.2f}")
    results["sweep"] = sweep_rows
    results["sweep_run"] = bool(sweep_settings)
    results["partial_recovery_settings"] = [
        s["setting"] for s in sweep_rows
        if s["forget_unlearned"] <= chance_accuracy("train") + 0.1 and s["recovery_fraction"] < 0.7]
    results["verdict"] = verdict(results)
    write_json(out / "results.json", results)
    write_report(out / "report.html", "Is RMU shallow? Junk-direction diagnosis on the model organism",
                 report_blocks(results), results=results)
    return results


def _mean_std_into(results: dict, name: str, stat: SeedStat) -> None:
    results[name], results[name + "_std"] = stat.mean, stat.std


def _aggregate(rows: list[dict], nl: int) -> dict[str, Any]:
    """The seed statistics of the main setting (means, with ``_std`` companions for the headline numbers)."""
    r: dict[str, Any] = {}
    for name, pick in (("forget_accuracy", lambda a, f: a[FORGET][f]),
                       ("retain_accuracy", lambda a, f: retain_accuracy(a)[f])):
        train = {c: over_seeds(rows, lambda x, c=c, p=pick: p(x["accuracy"][c], "train")) for c in CONDITIONS}
        r[name] = {c: st.mean for c, st in train.items()}
        r[name + "_std"] = {c: st.std for c, st in train.items()}
        r[name + "_by_format"] = {f: {c: over_seeds(rows, lambda x, c=c, f=f, p=pick: p(x["accuracy"][c], f)).mean
                                      for c in CONDITIONS if f in rows[0]["accuracy"][c][FORGET]} for f in FORMATS}
    r["chance"] = {f: chance_accuracy(f) for f in FORMATS}

    def per_layer(fn) -> list[float]:
        return [over_seeds(rows, lambda x, i=i: fn(x)[i]).mean for i in range(nl)]

    r["norm_ratio_forget"] = per_layer(lambda x: x["norm_ratio_forget"])
    r["norm_ratio_retain"] = per_layer(lambda x: x["norm_ratio_retain"])
    r["cos_direction_steering"] = per_layer(lambda x: x["cos"]["mean_diff"])
    r["cos_by_candidate"] = {k: per_layer(lambda x, k=k: x["cos"][k]) for k in rows[0]["cos"]}
    r["explained_by_candidate"] = {k: per_layer(lambda x, k=k: x["explained"][k]) for k in rows[0]["explained"]}
    recovery = over_seeds(rows, lambda x: x["recovery"]["train"])
    _mean_std_into(r, "recovery_fraction", recovery)
    _mean_std_into(r, "control_recovery_fraction", over_seeds(rows, lambda x: x["control_recovery"]["train"]))
    r["recovery_fraction_by_format"] = {f: over_seeds(rows, lambda x, f=f: x["recovery"][f]).mean for f in FORMATS}
    r["recovery_fraction_per_seed"] = list(recovery.per_seed)
    for key, name in (("coherence", "coherence_nll"), ("entropy", "next_token_entropy")):
        r[name] = {k: over_seeds(rows, lambda x, k=k, key=key: x[key][k]).mean for k in ("base", "unlearned", "ablated")}
    r["steering_coeff"] = [x["steering_coeff"] for x in rows]
    r["per_seed"] = [{k: v for k, v in x.items() if k not in ("cos", "explained")} for x in rows]
    return r


def _sweep_summary(rows: list[dict]) -> dict:
    def train(cond: str, acc=lambda a: a[FORGET]) -> SeedStat:
        return over_seeds(rows, lambda r: acc(r["accuracy"][cond])["train"])

    rec = over_seeds(rows, lambda r: r["recovery"]["train"])
    return {
        "steering_coeff": over_seeds(rows, lambda r: r["steering_coeff"]).mean,
        "norm_ratio_forget": over_seeds(rows, lambda r: r["norm_ratio_forget_at_layer"]).mean,
        "forget_unlearned": train("unlearned").mean,
        "forget_ablated": train("ablated").mean,
        "retain_unlearned": train("unlearned", retain_accuracy).mean,
        "recovery_fraction": rec.mean, "recovery_fraction_std": rec.std, "recovery_per_seed": list(rec.per_seed),
    }


def verdict(r: dict) -> str:
    rec = r["recovery_fraction"]
    if math.isnan(rec):
        return "RMU did not lower forget accuracy, so there is nothing to recover."
    depth = "mostly shallow" if rec >= 0.7 else ("partly shallow" if rec >= 0.3 else "mostly deep")
    partial = r["partial_recovery_settings"]
    if not r.get("sweep_run", True):
        tail = " (Strength sweep not run.)"
    elif partial:
        tail = f" Settings with only partial recovery (< 0.7) despite forgetting: {', '.join(partial)}."
    else:
        tail = " No swept setting gave partial recovery while forgetting."
    return (f"RMU here is {depth}: projecting one direction out restores {rec:.0%} of the forgotten cloze accuracy "
            f"(random-direction control {r['control_recovery_fraction']:.0%}); the direction's |cos| with the "
            f"steering vector at the RMU layer is {r['cos_direction_steering'][r['rmu_layer']]:.2f}.{tail}")


def report_blocks(r: dict) -> list:
    conds = [c for c in CONDITIONS if all(c in r["forget_accuracy_by_format"][f] for f in FORMATS)]
    groups = [f"forget {f}" for f in FORMATS] + [f"retain {f}" for f in FORMATS]
    bars = grouped_bars(groups, {c: [r["forget_accuracy_by_format"][f][c] for f in FORMATS]
                                 + [r["retain_accuracy_by_format"][f][c] for f in FORMATS] for c in conds},
                        "Accuracy by condition and format (mean over seeds)", "accuracy", y_range=(0, 1.05))
    sweep = grouped_bars([s["setting"] for s in r["sweep"]],
                         {"recovery": [SeedStat(s["recovery_fraction"], s["recovery_fraction_std"],
                                                tuple(s["recovery_per_seed"])) for s in r["sweep"]],
                          "forget acc. after RMU": [s["forget_unlearned"] for s in r["sweep"]]},
                         "Recovery by the junk-direction ablation vs RMU strength (mean ± std over seeds)",
                         "recovery fraction / accuracy")
    acc_rows = [{"format": f, **{c: r["forget_accuracy_by_format"][f].get(c, "not run") for c in CONDITIONS}}
                for f in FORMATS]
    sweep_rows = [{k: s[k] for k in ("setting", "steering_coeff", "norm_ratio_forget", "forget_unlearned",
                                     "forget_ablated", "retain_unlearned", "recovery_fraction",
                                     "recovery_fraction_std")} for s in r["sweep"]]
    return [
        f"<p class='verdict'>{r['verdict']}</p>",
        "<p>Forget domain: <b>" + r["forget_domain"] + f"</b>; RMU layer {r['rmu_layer']}; seeds {r['seeds']}. "
        "Ablation projects the mean unlearned-minus-base direction (at the RMU layer, forget tokens) out of the "
        "residual stream at every layer from the RMU layer on (:func:`mechun.junk.junk_recovery`). Recovery fraction "
        "= (ablated − unlearned) / (base − unlearned) on the trained cloze templates.</p>",
        ("h2", "Forget-domain accuracy (mean over seeds)"), table(acc_rows),
        "<p>The controls (a random direction; the ablation on the base model) are measured on the trained templates "
        "only: they have to show that nothing moves.</p>", bars,
        layer_lines({"forget prompts": r["norm_ratio_forget"], "retain prompts": r["norm_ratio_retain"]},
                    "Residual norm ratio, unlearned / base, by layer", "norm ratio", vline=r["rmu_layer"],
                    vline_label="RMU layer"),
        layer_lines(r["cos_by_candidate"], "Cosine of candidate junk directions with the steering vector u", "cos"),
        ("h2", "Depth: RMU strength sweep"),
        *([table(sweep_rows), sweep] if r.get("sweep_run", True) else
          ["<p>Not run (<code>--no-sweep</code>, as <code>make reproduce</code> does, to keep to the 5-seed headline). "
           "<code>mechun reproduce rmu-shallow --out DIR</code> adds three weaker and stronger settings over the "
           "same seeds (about four minutes more on 2 cores).</p>"]),
        ("h2", "Coherence of forget-prompt continuations"),
        table([{"condition": k, "NLL under base model": v, "next-token entropy": r["next_token_entropy"][k]}
               for k, v in r["coherence_nll"].items()]),
    ]


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
