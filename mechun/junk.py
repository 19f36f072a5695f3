"""The junk-direction diagnosis of an unlearned model, and the one recipe for how much it hides.

Arditi & Chughtai (2024) showed that RMU works largely by flooding forget-context activations with one large
vector: the residual-stream norm jumps at the RMU layer on forget prompts and not on retain prompts, and a single
direction -- the mean of unlearned minus base activations over forget tokens -- is nearly parallel to RMU's random
steering vector ``u``. Projecting that direction out of the residual stream from its layer on brings much of the
"forgotten" knowledge back. What comes back was *hidden* (shallow unlearning); what stays gone is *deep*.

Everything that measures this goes through two functions:

- :func:`diagnose_junk` -- per layer: the forget and retain norm ratios (unlearned / base), candidate directions
  and their alignment with the steering vector, from the four :class:`PairCaches`;
- :func:`junk_recovery` -- pick the layer (:meth:`JunkDiagnosis.peak_layer` unless given), project the direction
  out from there on, score, and compare with controls: a random direction of the same norm ablated from the same
  layers, and the junk direction ablated in the base model (which should change nothing). The recovery fraction is
  ``(ablated - unlearned) / (base - unlearned)`` per format.

The analyses (``rmu-shallow``, the depth card, ``mechun junk``) call these; none has its own copy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechun.cache import ResidualCache, cache_residuals
from mechun.errors import MechunError
from mechun.interventions import Direction, Intervention, applied, project_out
from mechun.models import Model, check_layer, d_model, model_fingerprint, n_layers

DirectionKind = Literal["mean_diff", "forget_minus_retain", "pca"]
Scores = Mapping[str, Mapping[str, float]]
"""What a score function returns: ``{group: {format: accuracy}}`` -- e.g. ``{"forget": {...}, "retain": {...}}``,
or :func:`mechun.evaluate.evaluate_world`'s ``{domain: {format: accuracy}}``."""
ScoreFn = Callable[[Model], Scores]
Control = Literal["random", "base"]


class PairCaches(NamedTuple):
    """``resid_post`` at every layer and token of the forget and retain prompts, for both models."""

    forget_base: ResidualCache
    forget_unlearned: ResidualCache
    retain_base: ResidualCache
    retain_unlearned: ResidualCache


def pair_caches(base: Model, unlearned: Model, forget_prompts: Sequence[str], retain_prompts: Sequence[str],
                unlearned_intervention: Intervention | None = None, progress: bool = False) -> PairCaches:
    """The four caches, computed once; pass them to :func:`diagnose_junk` and e.g.
    :func:`mechun.representation.cka_between`. ``unlearned_intervention`` is entered around the unlearned model's
    forwards only."""
    fb = cache_residuals(base, forget_prompts, positions="all", progress=progress)
    rb = cache_residuals(base, retain_prompts, positions="all", progress=progress)
    with applied(unlearned_intervention):
        fu = cache_residuals(unlearned, forget_prompts, positions="all", progress=progress)
        ru = cache_residuals(unlearned, retain_prompts, positions="all", progress=progress)
    return PairCaches(fb, fu, rb, ru)


@dataclass
class JunkDiagnosis:
    """Per-layer diagnosis of an (unlearned, base) pair. Lists have one entry per layer."""

    norm_ratio_forget: list[float]
    norm_ratio_retain: list[float]
    directions: dict[str, list[Tensor]]  # kind -> per-layer unit vectors
    cos_with_steering: dict[str, list[float]]  # kind -> per-layer cos with the steering vector (NaN if unknown)
    explained: dict[str, list[float]]  # kind -> share of the activation difference's energy along the direction
    n_forget_tokens: int
    n_filtered: int
    fingerprint: str  # of the unlearned model, which the directions are ablated in

    def peak_layer(self) -> int:
        """The layer where the forget-prompt norm ratio (unlearned / base) peaks (the first, on ties)."""
        return max(range(len(self.norm_ratio_forget)), key=lambda i: self.norm_ratio_forget[i])

    def direction(self, layer: int, kind: DirectionKind = "mean_diff") -> Direction:
        return Direction(self.directions[kind][layer], fingerprint=self.fingerprint, layer=layer,
                         meta={"kind": kind})

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("JunkDiagnosis", peak_layer=self.peak_layer(), norm_ratio_forget=self.norm_ratio_forget,
                          norm_ratio_retain=self.norm_ratio_retain, n_forget_tokens=self.n_forget_tokens)

    def _repr_html_(self) -> str:
        from mechun.display import frame, svg_lines, table

        peak = self.peak_layer()
        row = {"peak layer": peak, "norm ratio forget": self.norm_ratio_forget[peak],
               "norm ratio retain": self.norm_ratio_retain[peak],
               "explained (mean diff)": self.explained["mean_diff"][peak]}
        cos = self.cos_with_steering.get("mean_diff", [])
        if cos and not math.isnan(cos[peak]):
            row["cos with steering u"] = cos[peak]
        row |= {"forget tokens": self.n_forget_tokens, "outliers filtered": self.n_filtered}
        chart = svg_lines({"forget": self.norm_ratio_forget, "retain": self.norm_ratio_retain},
                          y_label="norm ratio", hline=1.0)
        return frame("JunkDiagnosis: residual norm ratio, unlearned / base", chart, table([row]),
                     hint="junk_recovery(base, unlearned, diagnosis, score) projects .direction(peak layer) out; "
                          "mechun.plots.layer_lines for the interactive figure")


def _tokens(cache: ResidualCache, layer: int) -> Float[Tensor, "n d_model"]:
    """Every real token but the first (BOS / attention sinks carry outsized norms) of one layer, flattened."""
    return cache[layer][:, 1:][cache.mask[:, 1:]].float()


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-12)


def diagnose_junk(
    base: Model,
    unlearned: Model,
    forget_prompts: Sequence[str],
    retain_prompts: Sequence[str],
    steering: Float[Tensor, " d_model"] | None = None,
    outlier_factor: float = 5.0,
    progress: bool = False,
    unlearned_intervention: Intervention | None = None,
    caches: PairCaches | None = None,
) -> JunkDiagnosis:
    """Norm profile, candidate junk directions per layer, and their alignment with the steering vector.

    Tokens are every real token of the prompts except the first (BOS / attention-sink tokens carry outsized norms);
    the outlier filter drops tokens whose base-model norm exceeds ``outlier_factor`` times the median.
    ``unlearned_intervention`` is entered around the unlearned model's forwards only (for an inference-time method
    such as SAE clamping, ``unlearned`` may then be the base model itself). ``caches``: the :func:`pair_caches` of
    these prompts, if already computed (they are not modified).
    """
    if d_model(base) != d_model(unlearned) or n_layers(base) != n_layers(unlearned):
        raise MechunError("base and unlearned models have different shapes; they must share an architecture")
    fb, fu, rb, ru = caches or pair_caches(base, unlearned, forget_prompts, retain_prompts, unlearned_intervention,
                                           progress)
    ratio_f, ratio_r, n_filtered = [], [], 0
    dirs: dict[str, list[Tensor]] = {"mean_diff": [], "forget_minus_retain": [], "pca": []}
    cos: dict[str, list[float]] = {k: [] for k in dirs}
    expl: dict[str, list[float]] = {k: [] for k in dirs}
    for layer in range(n_layers(base)):
        b, u = _tokens(fb, layer), _tokens(fu, layer)
        keep = b.norm(dim=-1) <= outlier_factor * b.norm(dim=-1).median()
        n_filtered = max(n_filtered, int((~keep).sum()))
        b, u = b[keep], u[keep]
        ratio_f.append(float(u.norm(dim=-1).mean() / b.norm(dim=-1).mean()))
        rbt, rut = _tokens(rb, layer), _tokens(ru, layer)
        ratio_r.append(float(rut.norm(dim=-1).mean() / rbt.norm(dim=-1).mean()))
        diff = u - b
        cands = {
            "mean_diff": diff.mean(0),
            "forget_minus_retain": u.mean(0) - rut.mean(0),
            "pca": torch.linalg.svd(diff - diff.mean(0), full_matrices=False).Vh[0] * diff.norm(),
        }
        energy = (diff ** 2).sum().clamp_min(1e-12)
        for kind, v in cands.items():
            unit = _unit(v)
            if kind == "pca" and float(unit @ diff.mean(0)) < 0:
                unit = -unit
            dirs[kind].append(unit)
            expl[kind].append(float(((diff @ unit) ** 2).sum() / energy))
            cos[kind].append(float(unit @ _unit(steering.float())) if steering is not None else float("nan"))
    return JunkDiagnosis(ratio_f, ratio_r, dirs, cos, expl, int(fb.mask[:, 1:].sum()), n_filtered,
                         model_fingerprint(unlearned))


def random_direction_like(v: Float[Tensor, " d_model"], seed: int = 0) -> Float[Tensor, " d_model"]:
    """A Gaussian random direction with ``v``'s norm (the control for an ablation of ``v``)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape[-1], generator=gen)
    return r / r.norm() * v.norm()


def recovery_fraction(base: float, unlearned: float, ablated: float) -> float:
    """(ablated - unlearned) / (base - unlearned); NaN when unlearning removed nothing to recover."""
    gap = base - unlearned
    return float("nan") if abs(gap) < 1e-9 else (ablated - unlearned) / gap


#: The seed offset of the random-direction control: the control for a run with seed ``s`` uses ``s + 1000``.
CONTROL_SEED_OFFSET = 1000


@dataclass
class JunkRecovery:
    """How much of the forgotten accuracy projecting the junk direction out brings back, with its controls.

    ``scores`` maps each condition to a score (``{group: {format: accuracy}}``): ``base``, ``unlearned``,
    ``ablated`` (unlearned, junk direction projected out from ``layer`` on), and the controls that were run:
    ``random_ablated`` (a random direction of the same norm, same layers) and ``base_ablated`` (the base model with
    the junk direction projected out). Recovery is measured on the ``forget`` group."""

    layer: int
    direction: Direction
    forget: str
    scores: dict[str, Scores] = field(default_factory=dict)

    def recovery(self, condition: str = "ablated") -> dict[str, float]:
        """Per format measured in all three, ``(condition - unlearned) / (base - unlearned)`` on the forget group."""
        b, u, a = (self.scores[c][self.forget] for c in ("base", "unlearned", condition))
        return {f: recovery_fraction(b[f], u[f], a[f]) for f in a if f in b and f in u}

    @property
    def recovery_by_format(self) -> dict[str, float]:
        return self.recovery("ablated")

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("JunkRecovery", forget=self.forget, layer=self.layer, recovery=self.recovery_by_format,
                          conditions=list(self.scores))

    def _repr_html_(self) -> str:
        from mechun.display import frame, table

        control = self.recovery("random_ablated") if "random_ablated" in self.scores else {}
        rows = []
        for f, r in self.recovery_by_format.items():
            row = {"format": f} | {c: self.scores[c][self.forget][f] for c in ("base", "unlearned", "ablated")}
            rows.append(row | {"recovery": r} | ({"random-direction control": control[f]} if f in control else {}))
        return frame(f"JunkRecovery on '{self.forget}' (direction projected out from layer {self.layer} on)",
                     table(rows), hint="recovery = (ablated - unlearned) / (base - unlearned); the control should be "
                                       "near 0")

    @property
    def control_recovery(self) -> dict[str, float]:
        """The random-direction control's recovery (should be near 0)."""
        return self.recovery("random_ablated")

    @contextmanager
    def ablation(self, model: Model) -> Iterator[None]:
        """The junk direction projected out of ``model`` from :attr:`layer` on (the recipe's intervention)."""
        with project_out(model, self.direction, layers=range(self.layer, n_layers(model))):
            yield


def junk_recovery(
    base: Model,
    unlearned: Model,
    diagnosis: JunkDiagnosis,
    score: ScoreFn,
    *,
    forget: str = "forget",
    layer: int | None = None,
    controls: Sequence[Control] = ("random",),
    before: Mapping[str, Scores] | None = None,
    intervention: Intervention | None = None,
    seed: int = 0,
    control_score: ScoreFn | None = None,
) -> JunkRecovery:
    """The junk-recovery recipe: ablate the diagnosis's mean-difference direction at ``layer`` (default: the
    diagnosis's peak layer) from that layer on in the unlearned model, score, and run the ``controls``.

    ``score(model)`` returns ``{group: {format: accuracy}}`` (it runs with the ablation hooks active); recovery is
    computed on ``score(...)[forget]``. ``before`` may hold the already-measured ``"base"`` and ``"unlearned"``
    scores so they are not recomputed. ``intervention`` (e.g. SAE clamping) is entered around every forward of
    the unlearned model. The random control uses a direction seeded ``seed + CONTROL_SEED_OFFSET``. The controls
    are scored with ``control_score`` if given (e.g. fewer formats: a control only has to show that nothing
    moves), else with ``score``."""
    control_score = control_score or score
    layer = diagnosis.peak_layer() if layer is None else check_layer(unlearned, layer)
    if not bool(diagnosis.directions["mean_diff"][layer].any()):
        raise MechunError(f"the unlearned model's forget activations at layer {layer} equal the base model's, so "
                          "there is no junk direction to project out: are the base and unlearned models the same "
                          "checkpoint?")
    rec = JunkRecovery(layer, diagnosis.direction(layer), forget)
    before = before or {}
    rec.scores["base"] = before["base"] if "base" in before else score(base)
    if "unlearned" in before:
        rec.scores["unlearned"] = before["unlearned"]
    else:
        with applied(intervention):
            rec.scores["unlearned"] = score(unlearned)
    with applied(intervention):
        with rec.ablation(unlearned):
            rec.scores["ablated"] = score(unlearned)
        if "random" in controls:
            rand = random_direction_like(rec.direction.vector, seed=seed + CONTROL_SEED_OFFSET)
            with project_out(unlearned, rand, layers=range(layer, n_layers(unlearned))):
                rec.scores["random_ablated"] = control_score(unlearned)
    if "base" in controls:  # the raw vector: the direction records the unlearned model's fingerprint
        with project_out(base, rec.direction.vector, layers=range(layer, n_layers(base))):
            rec.scores["base_ablated"] = control_score(base)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# The `mechun junk` jobs: load a pair, diagnose, recover, write results.json, report.html and the direction
# ---------------------------------------------------------------------------------------------------------------
def _norm_figure(diag: JunkDiagnosis, layer: int | None = None) -> Any:
    from mechun.plots import layer_lines

    return layer_lines({"forget prompts": diag.norm_ratio_forget, "retain prompts": diag.norm_ratio_retain},
                       "Residual norm ratio, unlearned / base, by layer", "norm ratio", hline=1.0, hline_label="",
                       vline=layer, vline_label="direction layer" if layer is not None else "")


def junk_prompts_job(base_dir: str | Path, unlearned_dir: str | Path, out: str | Path, forget_prompts: list[str],
                     retain_prompts: list[str], layer: int | None = None, overwrite: bool = False,
                     **load_kwargs: Any) -> dict:
    """Diagnosis only, for any pair of checkpoints (e.g. zephyr-7b-beta vs Zephyr_RMU) on your own prompts."""
    from mechun.io import atomic_dir, check_out_dir, write_json
    from mechun.models import load_model
    from mechun.report import write_report

    check_out_dir(out, overwrite)
    base, unl = load_model(base_dir, **load_kwargs), load_model(unlearned_dir, **load_kwargs)
    diag = diagnose_junk(base, unl, forget_prompts, retain_prompts, progress=True)
    layer = diag.peak_layer() if layer is None else check_layer(base, layer)
    results = {"base": str(base_dir), "unlearned": str(unlearned_dir), "layer": layer,
               "norm_ratio_forget": diag.norm_ratio_forget, "norm_ratio_retain": diag.norm_ratio_retain,
               "explained": diag.explained, "n_forget_tokens": diag.n_forget_tokens}
    with atomic_dir(out, "junk diagnosis", overwrite) as tmp:
        diag.direction(layer).save(tmp / "junk_direction.safetensors")
        write_json(tmp / "results.json", results)
        write_report(tmp / "report.html", f"Junk diagnosis: {unlearned_dir} vs {base_dir}",
                     [_norm_figure(diag, layer)], results=results)
    return results


def junk_pair_job(base_dir: str | Path, unlearned_dir: str | Path, out: str | Path, forget: str | None = None,
                  layer: int | None = None, overwrite: bool = False) -> dict:
    """Diagnosis and recovery (with both controls) for an organism pair, on the world's cloze prompts. The layer
    defaults to ``rmu.json``'s RMU layer, else the peak of the forget norm ratio."""
    from mechun.evaluate import FORMATS, evaluate_world
    from mechun.io import atomic_dir, check_out_dir, write_json
    from mechun.models import load_model
    from mechun.organism.world import DOMAINS, World, retain_domains
    from mechun.report import table, write_report
    from mechun.unlearn.rmu import load_steering

    check_out_dir(out, overwrite)
    world = World.load(base_dir)
    base, unl = load_model(base_dir, device="cpu"), load_model(unlearned_dir, device="cpu")
    rmu_json = Path(unlearned_dir) / "rmu.json"
    meta = json.loads(rmu_json.read_text()) if rmu_json.is_file() else {}
    forget = forget or meta.get("forget_domain") or (meta.get("config", {}).get("forget_domains") or [None])[0]
    if forget not in DOMAINS:
        raise MechunError(f"pass --forget DOMAIN (one of {list(DOMAINS)}); could not read it from rmu.json")
    steering = load_steering(unlearned_dir, d_model(base)).get(forget) if rmu_json.is_file() else None
    fp = [p.text for p in world.prompts(forget)]
    rp = [p.text for d in retain_domains() for p in world.prompts(d)]
    diag = diagnose_junk(base, unl, fp, rp, steering=steering)
    layer = layer if layer is not None else meta.get("config", {}).get("layer")
    rec = junk_recovery(base, unl, diag, lambda m: evaluate_world(m, world), forget=forget, layer=layer,
                        controls=("random", "base"))
    results = {"base": str(base_dir), "unlearned": str(unlearned_dir), "forget_domain": forget, "layer": rec.layer,
               "norm_ratio_forget": diag.norm_ratio_forget, "norm_ratio_retain": diag.norm_ratio_retain,
               "cos_direction_steering": diag.cos_with_steering["mean_diff"], "explained": diag.explained,
               "accuracy": rec.scores, "recovery_fraction_by_format": rec.recovery_by_format,
               "control_recovery_fraction_by_format": rec.control_recovery}
    rows = [{"condition": c, **{f: s[forget][f] for f in FORMATS}} for c, s in rec.scores.items()]
    with atomic_dir(out, "junk diagnosis", overwrite) as tmp:
        rec.direction.save(tmp / "junk_direction.safetensors")
        write_json(tmp / "results.json", results)
        write_report(tmp / "report.html", f"Junk diagnosis: {Path(unlearned_dir).name} vs {Path(base_dir).name}",
                     [("h2", f"Forget domain '{forget}', ablation from layer {rec.layer}"), table(rows),
                      _norm_figure(diag, rec.layer)], results=results)
    return results
