"""Train the model organism and report what it knows, per domain and format.

Run as ``mechun reproduce organism --out DIR [--quick] [--seed N]`` or ``python -m analyses.organism_baseline``.
Writes ``DIR/organism/`` (the checkpoint), ``DIR/results.json`` and ``DIR/report.html``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mechun import plots
from mechun.evaluate import chance_accuracy, evaluate_world
from mechun.models import load_model, model_fingerprint
from mechun.organism.train import ensure_organism
from mechun.organism.world import DOMAINS, World
from mechun.report import table, write_report


def run(out: Path, quick: bool = False, seed: int = 0, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = "tiny" if quick else "small"
    ckpt = ensure_organism(out / "organism", preset=preset, seed=seed)
    model = load_model(ckpt, device="cpu")
    world = World.load(ckpt)
    accuracy = evaluate_world(model, world)
    training = json.loads((ckpt / "training.json").read_text())
    results = {
        "model": str(ckpt), "fingerprint": model_fingerprint(model), "accuracy": accuracy,
        "chance": {"train": chance_accuracy("train"), "paraphrase": chance_accuracy("paraphrase"),
                   "mcq": chance_accuracy("mcq")},
        "training": {k: training[k] for k in ("preset", "config", "seed", "steps", "seconds", "final_loss")},
        "seeds": [seed], "config": {"preset": preset, "quick": quick},
    }
    rows = [{"domain": d, "kind": DOMAINS[d], **a} for d, a in accuracy.items()]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out / "report.html", "mechun: the model organism and what it knows", [
        "<p>A GPT-2-architecture model trained by mechun on a synthetic knowledge world (two forget-candidate "
        "domains, two retain domains). <b>train</b>: the trained cloze templates; <b>paraphrase</b>: held-out "
        "templates never seen in training; <b>mcq</b>: A-D questions in option orders never seen in training.</p>",
        table(rows),
        plots.accuracy_bars(accuracy, chance={"mcq": 0.25, "cloze": chance_accuracy("train")}),
        plots.line(training["loss_curve"], "Training loss", y_title="LM loss"),
    ], results=results)
    return results


if __name__ == "__main__":
    from analyses.common import script_main

    script_main(run, __doc__)
