"""Train the model organism and report what it knows, per domain and format, and how linearly it encodes it.

Run as ``mechun reproduce organism --out DIR [--quick] [--seed N]`` or
``python analyses/organism_baseline.py --out DIR``.
Writes ``DIR/results.json`` and ``DIR/report.html``; the checkpoint is the per-machine cached organism (its path is
in results.json).

* ``accuracy``: domain -> format -> accuracy; ``train`` (trained templates), ``paraphrase`` (held-out templates),
  ``mcq`` (facts never seen in MCQ form, mean over all 24 option orders) and ``mcq_all_orders`` (share of those
  facts right in every order);
* ``probe_heldout``: relation -> held-out-subject linear-probe accuracy at the best layer (residual stream at the
  last prompt token, eight folds over subjects, :func:`mechun.representation.probe_recoverability`), with
  ``probe_layer`` the layer and ``probe_chance`` a guess by the training folds' value frequencies;
* ``sae``: an SAE (sae-lens, d_sae = 8 x d_model) trained at the RMU layer on the organism's training text, and how
  many of its features pass SAEBench's selection rule for the forget domain (retain frequency < 0.01), counted with
  forget frequency > 0 (the rule as written) and >= 0.01 (features that fire on forget text at least as often as
  the retain threshold allows on retain text);
* ``train_seconds``: how long the organism took to train (when this run trained it, or when the cache did).
"""

from __future__ import annotations

import json
from pathlib import Path

from mechun import plots
from mechun.evaluate import chance_accuracy, evaluate_world
from mechun.io import write_json
from mechun.models import model_fingerprint
from mechun.organism.world import DOMAINS, RELATIONS, World
from mechun.report import table, write_report
from mechun.representation import probe_recoverability
from mechun.reproduce import prepare, preset_for
from mechun.sae import domain_sae
from mechun.unlearn.rmu import main_setting

FORGET = "pathogen"


def probes(model, world: World) -> dict[str, dict]:
    """Per relation: the held-out-subject probe accuracy per layer, its best layer, chance and ceiling."""
    out = {}
    for rel in RELATIONS:
        prompts = world.prompts(facts=world.facts_of(relation=rel.name))
        r = probe_recoverability(model, [p.text for p in prompts], [p.fact.subject for p in prompts],
                                 [p.answer for p in prompts])
        best = max(range(len(r.accuracy)), key=r.accuracy.__getitem__)
        out[rel.name] = {"best": r.accuracy[best], "layer": best, "chance": r.chance, "ceiling": r.ceiling,
                         "per_layer": r.accuracy}
    return out


def sae_features(model, world: World, quick: bool, seed: int) -> dict:
    """Train an SAE at the RMU layer and count the features SAEBench's rule would select for ``FORGET``."""
    from mechun.models import n_layers

    forget, retain = world.corpora([FORGET])
    d = domain_sae(model, world.training_texts(), forget[FORGET], retain, layer=main_setting(n_layers(model)).layer,
                   training_tokens=30_000 if quick else 120_000, seed=seed)
    return {"layer": d.layer, "forget_domain": FORGET, **d.counts()}


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None) -> dict:
    out, ckpt, world, model = prepare(out, quick, seed, organism)
    preset = preset_for(quick)
    log("evaluating every format (MCQ in all 24 option orders)")
    accuracy = evaluate_world(model, world, all_orders=True)
    log("probing each relation on held-out subjects")
    probe = probes(model, world)
    log("training an SAE at the RMU layer")
    sae = sae_features(model, world, quick, seed)
    training = json.loads((ckpt / "training.json").read_text())
    results = {
        "model": str(ckpt), "fingerprint": model_fingerprint(model), "accuracy": accuracy,
        "chance": {"train": chance_accuracy("train"), "paraphrase": chance_accuracy("paraphrase"),
                   "mcq": chance_accuracy("mcq"), "mcq_all_orders": 0.25 ** 24},
        "probe_heldout": {r: p["best"] for r, p in probe.items()},
        "probe_layer": {r: p["layer"] for r, p in probe.items()},
        "probe_chance": {r: p["chance"] for r, p in probe.items()},
        "probe_ceiling": {r: p["ceiling"] for r, p in probe.items()},
        "probe_per_layer": {r: p["per_layer"] for r, p in probe.items()},
        "sae": sae, "train_seconds": training["seconds"],
        "training": {k: training[k] for k in ("preset", "config", "seed", "steps", "seconds", "final_loss")},
        "n_facts": len(world.facts), "n_mcq_test_facts": len(world.mcq_facts()),
        "seeds": [seed], "config": {"preset": preset, "quick": quick},
    }
    rows = [{"domain": d, "kind": DOMAINS[d], **a} for d, a in accuracy.items()]
    probe_rows = [{"relation": r.name, "domain": r.domain, "best layer": probe[r.name]["layer"],
                   "held-out probe": probe[r.name]["best"], "chance": probe[r.name]["chance"],
                   "ceiling": probe[r.name]["ceiling"]} for r in RELATIONS]
    write_json(out / "results.json", results)
    write_report(out / "report.html", "mechun: the model organism and what it knows", [
        f"<p>A GPT-2-architecture model trained by mechun on a synthetic knowledge world ({len(DOMAINS)} domains, "
        f"{len(world.facts)} facts; preset <b>{training['preset']}</b>, seed {seed}, trained in "
        f"{training['seconds']:.0f} s). <b>train</b>: the trained cloze templates; <b>paraphrase</b>: held-out "
        "templates never seen in training; <b>mcq</b>: A-D questions about facts never seen in MCQ form, mean over "
        "all 24 option orders; <b>mcq_all_orders</b>: share of those questions answered right in every order.</p>",
        table(rows),
        plots.accuracy_bars(accuracy, chance={"mcq": chance_accuracy("mcq"), "cloze": chance_accuracy("train")}),
        "<h2>Held-out-subject linear probes</h2><p>Residual stream at the last prompt token, row-normalised; eight "
        "folds over subjects: a probe trained on seven predicts the relation's value for the eighth, each fold in "
        "turn. Chance: a guess by the training folds' value frequencies; ceiling: the share of values seen in "
        "training.</p>",
        table(probe_rows),
        f"<h2>SAE features specific to {FORGET}</h2><p>An SAE with {sae['d_sae']} features at layer {sae['layer']} "
        f"(the RMU layer): {sae['passing']} features fire on {FORGET} passages and on under 1 % of retain tokens "
        f"(SAEBench's rule); {sae['passing_forget_freq_0.01']} of them fire on at least 1 % of {FORGET} tokens "
        f"({sae['alive']} features alive).</p>",
        plots.line(training["loss_curve"], "Training loss", y_title="LM loss"),
    ], results=results)
    return results


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
