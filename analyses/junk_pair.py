"""Junk diagnosis and recovery for any (base, unlearned) pair of organism checkpoints: ``mechun junk``.

Writes ``OUT/results.json``, ``OUT/report.html`` and ``OUT/junk_direction.safetensors`` (the mean-difference
direction at the RMU layer, with the unlearned model's fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go

import mechun
from mechun.evaluate import FORMATS, evaluate_world
from mechun.models import load_model, n_layers
from mechun.organism.world import DOMAINS, World
from mechun.report import table, write_report
from mechun.rmu import diagnose_junk, load_steering, random_direction_like, recovery_fraction


def run_prompts(base_dir: str, unlearned_dir: str, out: Path, forget_prompts: list[str], retain_prompts: list[str],
                layer: int | None = None, **load_kwargs) -> dict:
    """Diagnosis only, for any pair of checkpoints (e.g. zephyr-7b-beta vs Zephyr_RMU) on your own prompt files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, unl = load_model(base_dir, **load_kwargs), load_model(unlearned_dir, **load_kwargs)
    diag = diagnose_junk(base, unl, forget_prompts, retain_prompts, progress=True)
    if layer is None:
        layer = max(range(n_layers(base)), key=lambda i: diag.norm_ratio_forget[i])
    diag.direction(layer).save(out / "junk_direction.safetensors")
    results = {"base": str(base_dir), "unlearned": str(unlearned_dir), "layer": layer,
               "norm_ratio_forget": diag.norm_ratio_forget, "norm_ratio_retain": diag.norm_ratio_retain,
               "explained": diag.explained, "n_forget_tokens": diag.n_forget_tokens}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    layers = list(range(n_layers(base)))
    fig = go.Figure([go.Scatter(x=layers, y=diag.norm_ratio_forget, name="forget"),
                     go.Scatter(x=layers, y=diag.norm_ratio_retain, name="retain")])
    fig.update_layout(title="Norm ratio unlearned/base by layer", xaxis_title="layer", template="plotly_white")
    write_report(out / "report.html", f"Junk diagnosis: {unlearned_dir} vs {base_dir}", [fig], results=results)
    return results


def run(base_dir: Path, unlearned_dir: Path, out: Path, forget: str | None = None, layer: int | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = World.load(base_dir)
    base, unl = load_model(base_dir, device="cpu"), load_model(unlearned_dir, device="cpu")
    rmu_json = Path(unlearned_dir) / "rmu.json"
    meta = json.loads(rmu_json.read_text()) if rmu_json.is_file() else {}
    forget = forget or meta.get("forget_domain") or (meta.get("config", {}).get("forget_domains") or [None])[0]
    if forget not in DOMAINS:
        raise mechun.MechunError(f"pass --forget DOMAIN (one of {list(DOMAINS)}); could not read it from rmu.json")
    steering = load_steering(unlearned_dir).get(forget) if rmu_json.is_file() else None
    fp = [p.text for p in world.prompts(forget)]
    rp = [p.text for d, k in DOMAINS.items() if k == "retain" for p in world.prompts(d)]
    diag = diagnose_junk(base, unl, fp, rp, steering=steering)
    if layer is None:
        layer = meta.get("config", {}).get("layer")
    if layer is None:  # no rmu.json: the layer where the forget-prompt norm ratio peaks
        layer = max(range(n_layers(base)), key=lambda i: diag.norm_ratio_forget[i])
    direction = diag.direction(layer)
    direction.save(out / "junk_direction.safetensors")
    after = range(layer, n_layers(base))
    acc = {"base": evaluate_world(base, world), "unlearned": evaluate_world(unl, world)}
    with mechun.project_out(unl, direction, layers=after):
        acc["ablated"] = evaluate_world(unl, world)
    with mechun.project_out(unl, random_direction_like(direction.vector), layers=after):
        acc["random_ablated"] = evaluate_world(unl, world)
    with mechun.project_out(base, direction.vector, layers=after):
        acc["base_ablated"] = evaluate_world(base, world)
    rec = {f: recovery_fraction(acc["base"][forget][f], acc["unlearned"][forget][f], acc["ablated"][forget][f])
           for f in FORMATS}
    results = {"base": str(base_dir), "unlearned": str(unlearned_dir), "forget_domain": forget, "layer": layer,
               "norm_ratio_forget": diag.norm_ratio_forget, "norm_ratio_retain": diag.norm_ratio_retain,
               "cos_direction_steering": diag.cos_with_steering["mean_diff"], "explained": diag.explained,
               "accuracy": acc, "recovery_fraction_by_format": rec}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    layers = list(range(n_layers(base)))
    fig = go.Figure([go.Scatter(x=layers, y=diag.norm_ratio_forget, name="forget"),
                     go.Scatter(x=layers, y=diag.norm_ratio_retain, name="retain")])
    fig.update_layout(title="Norm ratio unlearned/base by layer", xaxis_title="layer", template="plotly_white")
    rows = [{"condition": c, **{f: acc[c][forget][f] for f in FORMATS}} for c in acc]
    write_report(out / "report.html", f"Junk diagnosis: {Path(unlearned_dir).name} vs {Path(base_dir).name}",
                 [("h2", f"Forget domain '{forget}', ablation from layer {layer}"), table(rows), fig],
                 results=results)
    return results
