"""RMU (Representation Misdirection for Unlearning) and the diagnosis of its "junk" direction.

**RMU** (Li et al. 2024, WMDP) fine-tunes a few MLP output matrices so that, on forget-domain text, the residual
stream after layer ``l`` is pushed towards ``c * u`` -- ``u`` a fixed random unit vector (drawn uniform in [0, 1)^d,
then normalised), ``c`` a large coefficient -- while on retain text it stays close to the frozen model's:

    loss = MSE(h_l(forget), c u)  +  alpha * MSE(h_l(retain), h_l^frozen(retain))

Each forget domain gets its own ``u``; batches cycle through the domains; only the MLP output weights of layers
``l-2 .. l`` move (AdamW), as in the WMDP code.

**Junk diagnosis** (Arditi & Chughtai 2024). The unlearned model floods forget-context activations with a large
vector: the norm of the residual stream jumps at layer ``l`` on forget prompts and not on retain prompts. A single
direction -- the mean of unlearned minus base activations over forget tokens -- is nearly parallel to ``u``;
projecting it out of the residual stream from layer ``l`` on restores much of the "forgotten" knowledge. What comes
back is *shallow* unlearning; what stays gone is *deep*. Controls: ablating a random direction, and ablating the
junk direction in the base model (which should change nothing).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechun.cache import cache_residuals
from mechun.errors import MechunError
from mechun.hooks import StopForward, bare_layer_hooks
from mechun.interventions import Direction, Intervention, applied
from mechun.models import (
    check_layer,
    d_model,
    model_device,
    model_fingerprint,
    n_layers,
    save_model,
    tokenize,
)


@dataclass
class RMUConfig:
    """Hyper-parameters of one RMU run. ``steering_coeff=None`` picks ``auto_coeff_mult`` times the base model's
    mean residual norm on forget tokens at ``layer`` (mechun's default for models whose norms are unknown; WMDP used
    a fixed c = 6.5 on Zephyr-7B)."""

    forget_domains: list[str]
    layer: int | None = None
    steering_coeff: float | None = None
    alpha: float = 100.0
    lr: float = 1e-3
    steps: int = 150
    batch_size: int = 16
    update_layers: list[int] | None = None
    seed: int = 0
    auto_coeff_mult: float = 6.0

    def resolved(self, model: Any) -> RMUConfig:
        layer = check_layer(model, self.layer if self.layer is not None else n_layers(model) // 2)
        update = self.update_layers if self.update_layers is not None else [x for x in (layer - 2, layer - 1, layer)
                                                                           if x >= 0]
        for x in update:
            check_layer(model, x)
        if not self.forget_domains:
            raise MechunError("RMU needs at least one forget domain")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.alpha < 0:
            raise MechunError("steps and batch_size must be >= 1, lr > 0 and alpha >= 0")
        return RMUConfig(**{**asdict(self), "layer": layer, "update_layers": sorted(update)})


@dataclass
class RMUResult:
    config: RMUConfig
    steering: dict[str, Tensor]  # domain -> c * u
    losses: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "steering_coeff": self.config.steering_coeff,
                "steering_vectors": {k: v.tolist() for k, v in self.steering.items()}, "losses": self.losses}


def mlp_out_weight(model: Any, layer: int) -> torch.nn.Parameter:
    """The MLP output matrix of a layer (GPT-2 ``mlp.c_proj``, Llama/Mistral/Gemma ``mlp.down_proj``)."""
    mlp = model.blocks[check_layer(model, layer)].mlp
    out = getattr(mlp, "out", None)
    if out is None:
        raise MechunError(f"cannot find the MLP output projection of layer {layer} for this architecture")
    return getattr(out, "_original_component", out).weight


def layer_activations(model: Any, ids: Tensor, mask: Tensor, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """``blocks.{layer}.hook_resid_post`` with gradients (the forward stops after ``layer``)."""
    box: dict[str, Tensor] = {}

    def grab(act: Tensor):
        box["act"] = act
        raise StopForward

    dev = model_device(model)
    with bare_layer_hooks(model, [(layer, "resid_post", grab)]) as bare:
        try:
            bare(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        except StopForward:
            pass
    return box["act"]


def _masked_mse(act: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(act.device, act.dtype)[..., None]
    return (((act - target) ** 2) * m).sum() / (m.sum() * act.shape[-1])


def steering_vectors(d: int, domains: Sequence[str], coeff: float, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for dom in domains:
        u = torch.rand(d, generator=gen)
        out[dom] = u / u.norm() * coeff
    return out


def rmu_unlearn(
    model: Any,
    frozen: Any,
    forget_texts: Mapping[str, Sequence[str]],
    retain_texts: Sequence[str],
    config: RMUConfig,
    progress: bool = True,
) -> RMUResult:
    """Run RMU on ``model`` **in place** (only the MLP output weights of ``config.update_layers`` change).

    ``frozen`` is a second copy of the same base model (its weights are never touched); ``forget_texts`` maps each
    forget domain to its corpus, ``retain_texts`` is the retain corpus.
    """
    cfg = config.resolved(model)
    missing = [d for d in cfg.forget_domains if not forget_texts.get(d)]
    if missing or not retain_texts:
        raise MechunError(f"empty corpus for {missing or 'retain'}; pass texts for every forget domain and retain")
    if model_fingerprint(model) != model_fingerprint(frozen):
        raise MechunError("model and frozen must start as the same weights (load the base checkpoint twice)")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    layer = cfg.layer
    if cfg.steering_coeff is None:
        with torch.no_grad():
            texts = [t for d in cfg.forget_domains for t in forget_texts[d]][:256]
            ids, mask = tokenize(frozen, texts)
            act = layer_activations(frozen, ids, mask, layer)
            norm = act.norm(dim=-1)[mask.bool().to(act.device)].mean().item()
        cfg.steering_coeff = round(cfg.auto_coeff_mult * norm, 3)
    steer = steering_vectors(d_model(model), cfg.forget_domains, cfg.steering_coeff, cfg.seed)

    for p in model.parameters():
        p.requires_grad_(False)
    params = [mlp_out_weight(model, x) for x in cfg.update_layers]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    result = RMUResult(cfg, steer)
    model.train(False)
    try:
        for step in tqdm(range(cfg.steps), desc=f"RMU (layer {layer}, c={cfg.steering_coeff:g})", disable=not progress,
                         mininterval=1.0):
            dom = cfg.forget_domains[step % len(cfg.forget_domains)]
            f_ids, f_mask = tokenize(model, rng.sample(list(forget_texts[dom]), min(cfg.batch_size,
                                                                                     len(forget_texts[dom]))))
            r_ids, r_mask = tokenize(model, rng.sample(list(retain_texts), min(cfg.batch_size, len(retain_texts))))
            h_forget = layer_activations(model, f_ids, f_mask, layer)
            forget_loss = _masked_mse(h_forget, steer[dom].to(h_forget), f_mask)
            h_retain = layer_activations(model, r_ids, r_mask, layer)
            with torch.no_grad():
                h_frozen = layer_activations(frozen, r_ids, r_mask, layer)
            retain_loss = cfg.alpha * _masked_mse(h_retain, h_frozen, r_mask)
            loss = forget_loss + retain_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.losses.append({"forget": forget_loss.item(), "retain": retain_loss.item()})
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return result


def save_unlearned(model: Any, result: RMUResult, out_dir: str | Path, extra: Mapping[str, Any] | None = None,
                   files: Mapping[str, Any] | None = None) -> Path:
    """Save the unlearned model as a local HF checkpoint dir with ``rmu.json`` (hyper-parameters, steering vectors,
    ``extra``) and any other JSON ``files`` (e.g. ``world.json``), all written atomically together."""
    return save_model(model, out_dir, extra_files={"rmu.json": {**result.to_json(), **(extra or {})}, **(files or {})})


def load_steering(model_dir: str | Path) -> dict[str, Tensor]:
    p = Path(model_dir) / "rmu.json"
    if not p.is_file():
        raise MechunError(f"no rmu.json in {model_dir}; was it made by mechun rmu?")
    return {k: torch.tensor(v) for k, v in json.loads(p.read_text())["steering_vectors"].items()}


# ---------------------------------------------------------------------------------------------------------------
# Junk diagnosis
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class JunkDiagnosis:
    """Per-layer diagnosis of an (unlearned, base) pair. Lists have one entry per layer."""

    norm_ratio_forget: list[float]
    norm_ratio_retain: list[float]
    directions: dict[str, list[Tensor]]  # kind -> per-layer unit vectors
    cos_with_steering: dict[str, list[float]]  # kind -> per-layer |cos| with the steering vector (if known)
    explained: dict[str, list[float]]  # kind -> share of the activation difference's energy along the direction
    n_forget_tokens: int
    n_filtered: int
    fingerprint: str  # of the unlearned model, which the directions are ablated in

    def direction(self, layer: int, kind: str = "mean_diff") -> Direction:
        return Direction(self.directions[kind][layer], fingerprint=self.fingerprint, layer=layer,
                         meta={"kind": kind})


def _tokens(cache, layer: int) -> Tensor:
    """Every real token but the first (BOS / attention sinks carry outsized norms) of one layer, flattened."""
    return cache[layer][:, 1:][cache.mask[:, 1:]].float()


def pair_caches(base: Any, unlearned: Any, forget_prompts: Sequence[str], retain_prompts: Sequence[str],
                unlearned_intervention: Intervention | None = None, progress: bool = False) -> tuple:
    """``resid_post`` at every layer and token of the forget and retain prompts, for both models:
    ``(forget_base, forget_unlearned, retain_base, retain_unlearned)``. Pass them to :func:`diagnose_junk` (and
    e.g. :func:`mechun.representation.cka_between`) so the four caches are computed once."""
    fb = cache_residuals(base, forget_prompts, positions="all", progress=progress)
    rb = cache_residuals(base, retain_prompts, positions="all", progress=progress)
    with applied(unlearned_intervention):
        fu = cache_residuals(unlearned, forget_prompts, positions="all", progress=progress)
        ru = cache_residuals(unlearned, retain_prompts, positions="all", progress=progress)
    return fb, fu, rb, ru


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-12)


def diagnose_junk(
    base: Any,
    unlearned: Any,
    forget_prompts: Sequence[str],
    retain_prompts: Sequence[str],
    steering: Tensor | None = None,
    outlier_factor: float = 5.0,
    progress: bool = False,
    unlearned_intervention: Intervention | None = None,
    caches: tuple | None = None,
) -> JunkDiagnosis:
    """Norm profile, candidate junk directions per layer, and their alignment with the steering vector.

    Tokens are every real token of the prompts except the first (BOS / attention-sink tokens carry outsized norms);
    the outlier filter drops tokens whose base-model norm exceeds ``outlier_factor`` times the median.
    ``unlearned_intervention`` is entered around the unlearned model's forwards only (for an inference-time method
    such as SAE clamping, ``unlearned`` may then be the base model itself). ``caches``: the four caches of
    :func:`pair_caches` for these prompts, if already computed.
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


def random_direction_like(v: Tensor, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape[-1], generator=gen)
    return r / r.norm() * v.norm()


def recovery_fraction(base: float, unlearned: float, ablated: float) -> float:
    """(ablated - unlearned) / (base - unlearned); NaN when unlearning removed nothing to recover."""
    gap = base - unlearned
    return float("nan") if abs(gap) < 1e-9 else (ablated - unlearned) / gap

