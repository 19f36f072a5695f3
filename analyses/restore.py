"""Corrupt, then unlearn the corruption: does unlearning *restore* what the model knew? (RESTOR, 2024)

Good unlearning of corrupting data should bring the model back to its clean state, not just stop it from saying
the false facts. On the organism:

1. **Corrupt**: fine-tune the whole model so that half of the ``people`` subjects' facts take a false value (the
   trained templates, with a maintain loss on every other fact and an LM loss on filler). The corrupting corpus is
   those false statements.
2. **Unlearn the corruption** from the corrupted model with each method:
   * gradient ascent on the false statements (every parameter; maintain loss on the other facts),
   * localized fine-tuning (``-log(1-p)`` on the false answers, only the MLPs that causal tracing of the false
     answer ranks highest, maintain and LM losses),
   * RMU with the false statements as forget corpus and everything else as retain corpus.
3. Measure on the corrupted facts: *forget* = accuracy of the false answers, *restore* = accuracy of the original
   true answers, restore fraction = (true after − true corrupted) / (true clean − true corrupted); and accuracy on
   every other fact (retain). Three seeds.

Run as ``mechun reproduce restore --out DIR [--quick] [--seed N]``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from mechun import plots
from mechun.edit import full_mask, localized_finetune, top_mlp_mask
from mechun.evaluate import cloze_accuracy
from mechun.io import write_json
from mechun.junk import recovery_fraction
from mechun.localize import mlp_trace_scores
from mechun.models import load_model, n_layers, save_model
from mechun.organism.world import Fact, Prompt, World, other_values
from mechun.report import table, write_report
from mechun.reproduce import prepare, seeds_for
from mechun.stats import over_seeds, seed_stat
from mechun.unlearn.rmu import RMUConfig, rmu_unlearn

DOMAIN = "people"
METHODS = ("gradient_ascent", "localized_ft", "rmu")


def corruption(world: World, seed: int) -> list[tuple[Fact, str]]:
    """Half of the domain's subjects, every fact of theirs with a random false value."""
    rng = random.Random(f"corrupt-{seed}")
    subjects = sorted({f.subject for f in world.facts_of(DOMAIN)})
    chosen = set(rng.sample(subjects, len(subjects) // 2))
    return [(f, rng.choice(other_values(f))) for f in world.facts_of(DOMAIN) if f.subject in chosen]


def _sets(world: World, corrupt: list[tuple[Fact, str]]) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """The corrupted facts' prompts with their true answers, the same prompts with the false values, and every
    other fact's prompts (the retain set)."""
    false = dict(corrupt)
    true = world.prompts(facts=list(false))
    wrong = [Prompt(p.text, false[p.fact], p.fact, p.template) for p in true]
    return true, wrong, world.prompts(facts=[f for f in world.facts if f not in false])


def measure(model: Any, world: World, corrupt: list[tuple[Fact, str]]) -> dict[str, float]:
    true, wrong, others = _sets(world, corrupt)
    return {"true": cloze_accuracy(model, true), "false": cloze_accuracy(model, wrong),
            "retain": cloze_accuracy(model, others)}


def unlearn(method: str, model: Any, frozen: Any, world: World, corrupt: list[tuple[Fact, str]], quick: bool,
            seed: int) -> dict:
    """Unlearn the corruption from ``model`` in place; ``frozen`` (a second copy of the corrupted model) is only
    used by RMU."""
    _, wrong, others = _sets(world, corrupt)
    texts, answers = [p.text for p in wrong], [p.answer for p in wrong]
    maintain = [(p.text, p.answer) for p in others]
    steps = 60 if quick else 120
    if method == "gradient_ascent":
        localized_finetune(model, full_mask(model), texts, answers, mode="ascent", maintain=maintain, steps=steps,
                           lr=1e-4, seed=seed)
        return {"steps": steps, "lr": 1e-4}
    if method == "localized_ft":
        items = [(p.text, p.answer, p.fact.subject) for p in wrong if p.template == 0][:4]
        mask = top_mlp_mask(model, mlp_trace_scores(model, items, seed=seed), 1 if n_layers(model) <= 3 else 2,
                            "causal tracing")
        localized_finetune(model, mask, texts, answers, mode="unlearn", maintain=maintain, lm_texts=world.filler,
                           steps=steps, lr=1e-3, seed=seed)
        return {"steps": steps, "components": [list(c) for c in mask.components]}
    subjects = {f.subject for f, _ in corrupt}
    retain = [t for t in world.training_texts() if not any(s in t for s in subjects)]
    cfg = RMUConfig(["corruption"], layer=max(1, n_layers(model) // 2 - 1), steps=steps * 2, auto_coeff_mult=5.0,
                    seed=seed)
    statements = [f"{t} {a} ." for t, a in zip(texts, answers, strict=True)]
    res = rmu_unlearn(model, frozen, {"corruption": statements}, retain, cfg, progress=False)
    return {"steps": cfg.steps, "layer": res.config.layer, "steering_coeff": res.config.steering_coeff}


def corrupt_model(model: Any, world: World, corrupt: list[tuple[Fact, str]], quick: bool, seed: int) -> None:
    _, wrong, others = _sets(world, corrupt)
    localized_finetune(model, full_mask(model), [p.text for p in wrong], [p.answer for p in wrong], mode="learn",
                       maintain=[(p.text, p.answer) for p in others], lm_texts=world.filler,
                       steps=60 if quick else 100, lr=1e-3, seed=seed)


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None) -> dict:
    out, ckpt, world, base = prepare(out, quick, seed, organism)
    seeds = seeds_for(seed, quick)
    rows = []
    for s in seeds:
        corrupt = corruption(world, s)
        clean = measure(base, world, corrupt)
        model = load_model(ckpt, device="cpu")
        corrupt_model(model, world, corrupt, quick, s)
        corrupted_dir = out / f"corrupted_seed{s}"
        if corrupted_dir.exists():
            shutil.rmtree(corrupted_dir)
        save_model(model, corrupted_dir)
        corrupted = measure(model, world, corrupt)
        log(f"seed {s}: clean true {clean['true']:.2f}; corrupted true {corrupted['true']:.2f} false "
            f"{corrupted['false']:.2f}")
        for method in METHODS:
            m = load_model(corrupted_dir, device="cpu")
            frozen = load_model(corrupted_dir, device="cpu") if method == "rmu" else None
            info = unlearn(method, m, frozen, world, corrupt, quick, s)
            after = measure(m, world, corrupt)
            rows.append({"seed": s, "method": method, **info, "clean": clean, "corrupted": corrupted, "after": after,
                         "restore_fraction": recovery_fraction(clean["true"], corrupted["true"], after["true"]),
                         "forget_fraction": recovery_fraction(0.0, corrupted["false"], after["false"])})
            log(f"  {method:<16} false {after['false']:.2f}  true {after['true']:.2f}  retain {after['retain']:.2f}")

    def agg(method: str, fn) -> dict[str, Any]:
        return over_seeds([r for r in rows if r["method"] == method], fn).to_json()

    summary = {m: {"false_after": agg(m, lambda r: r["after"]["false"]),
                   "true_after": agg(m, lambda r: r["after"]["true"]),
                   "retain_after": agg(m, lambda r: r["after"]["retain"]),
                   "restore_fraction": agg(m, lambda r: r["restore_fraction"])} for m in METHODS}
    corrupted = {k: agg(METHODS[0], lambda r, k=k: r["corrupted"][k]) for k in ("true", "false")}
    corrupted_true, corrupted_false = corrupted["true"]["mean"], corrupted["false"]["mean"]
    parts = [f"{m}: false {summary[m]['false_after']['mean']:.2f}, true {summary[m]['true_after']['mean']:.2f} "
             f"(restore {summary[m]['restore_fraction']['mean']:.0%})" for m in METHODS]
    verdict = (f"After corruption the model states the false values {corrupted_false:.0%} of the time and the true "
               f"ones {corrupted_true:.0%}. Unlearning the corruption: " + "; ".join(parts) + ". Forgetting the "
               "false facts is not the same as restoring the true ones." if corrupted_false > 0.5 else
               "The corruption did not take (false-value accuracy <= 0.5); nothing to test.")
    results = {"domain": DOMAIN, "seeds": seeds, "methods": list(METHODS), "summary": summary,
               "corrupted": {"true": corrupted_true, "false": corrupted_false}, "corrupted_over_seeds": corrupted,
               "verdict": verdict, "runs": rows}
    write_json(out / "results.json", results)
    fig = plots.grouped_bars(list(METHODS), {label: [seed_stat(summary[m][key]["per_seed"]) for m in METHODS]
                                             for key, label in (("false_after", "false values stated"),
                                                                ("true_after", "true values restored"),
                                                                ("retain_after", "other facts"))},
                             "Unlearning the corruption (mean ± std over seeds)", "accuracy", y_range=(0, 1.05))
    table_rows = [{"method": m, **{k: f"{seed_stat(v['per_seed'])}" for k, v in summary[m].items()}}
                  for m in METHODS]
    write_report(out / "report.html", "Corrupt, then unlearn: forgetting vs restoring (RESTOR)",
                 [f"<p class='verdict'>{verdict}</p>", fig, table(table_rows)], results=results)
    return results


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
