"""Train the model organism and report what it knows, per domain and format.

Run as ``mechun reproduce organism --out DIR [--quick] [--seed N]`` or
``python analyses/organism_baseline.py --out DIR``.
Writes ``DIR/results.json`` and ``DIR/report.html``; the checkpoint is the per-machine cached organism (its path is
in results.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from mechun import plots
from mechun.evaluate import chance_accuracy, evaluate_world
from mechun.io import write_json
from mechun.models import model_fingerprint
from mechun.organism.world import DOMAINS
from mechun.report import table, write_report
from mechun.reproduce import prepare, preset_for


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None) -> dict:
    out, ckpt, world, model = prepare(out, quick, seed, organism)
    preset = preset_for(quick)
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
    write_json(out / "results.json", results)
    write_report(out / "report.html", "mechun: the model organism and what it knows", [
        "<p>A GPT-2-architecture model trained by mechun on a synthetic knowledge world (two forget-candidate "
        "domains, two retain domains). <b>train</b>: the trained cloze templates; <b>paraphrase</b>: held-out "
        "templates never seen in training; <b>mcq</b>: A-D questions in option orders never seen in training.</p>",
        table(rows),
        plots.accuracy_bars(accuracy, chance={"mcq": chance_accuracy("mcq"), "cloze": chance_accuracy("train")}),
        plots.line(training["loss_curve"], "Training loss", y_title="LM loss"),
    ], results=results)
    return results


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
