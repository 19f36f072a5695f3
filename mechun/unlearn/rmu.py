"""RMU (Representation Misdirection for Unlearning) and the diagnosis of its "junk" direction.

**RMU** (Li et al. 2024, WMDP) fine-tunes a few MLP output matrices so that, on forget-domain text, the residual
stream after layer ``l`` is pushed towards ``c * u`` -- ``u`` a fixed random unit vector (drawn uniform in [0, 1)^d,
then normalised), ``c`` a large coefficient -- while on retain text it stays close to the frozen model's:

    loss = MSE(h_l(forget), c u)  +  alpha * MSE(h_l(retain), h_l^frozen(retain))

Each forget domain gets its own ``u``; batches cycle through the domains; only the MLP output weights of layers
``l-2 .. l`` move (AdamW), as in the WMDP code.

The loss is :func:`rmu_loss`; one optimisation step is in :func:`rmu_unlearn`. The diagnosis of what RMU leaves
behind (the "junk" direction, and how much projecting it out recovers) lives in :mod:`mechun.junk`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechun.errors import DamagedFileError, MechunError
from mechun.hooks import StopForward, bare_layer_hooks
from mechun.models import (
    Model,
    check_layer,
    d_model,
    foreign_hooks_present,
    model_device,
    model_fingerprint,
    n_layers,
    save_model,
    tokenize,
)
from mechun.progress import progress_bar


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

    def __post_init__(self) -> None:
        """Numbers are checked when the config is made, naming the field: NaN passes ``x <= 0`` checks, so every
        float must be finite."""
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MechunError(f"RMUConfig.{name} must be an integer >= 1, got {v!r}")
        for name, low, strict in (("lr", 0.0, True), ("alpha", 0.0, False), ("auto_coeff_mult", 0.0, True),
                                  ("steering_coeff", 0.0, True)):
            v = getattr(self, name)
            if v is None and name == "steering_coeff":
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or (
                    v <= low if strict else v < low):
                raise MechunError(f"RMUConfig.{name} must be a finite number {'>' if strict else '>='} {low:g}, "
                                  f"got {v!r}")

    def resolved(self, model: Model) -> RMUConfig:
        layer = check_layer(model, self.layer if self.layer is not None else n_layers(model) // 2)
        update = self.update_layers if self.update_layers is not None else [x for x in (layer - 2, layer - 1, layer)
                                                                           if x >= 0]
        for x in update:
            check_layer(model, x)
        if not self.forget_domains:
            raise MechunError("RMU needs at least one forget domain")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not self.alpha >= 0:  # `not >`: NaN fails
            raise MechunError("steps and batch_size must be >= 1, lr > 0 and alpha >= 0")
        if self.steering_coeff is not None and not (math.isfinite(self.steering_coeff) and self.steering_coeff > 0):
            raise MechunError(f"steering_coeff must be a finite number > 0 (got {self.steering_coeff})")
        return RMUConfig(**{**asdict(self), "layer": layer, "update_layers": sorted(update)})


def main_setting(n_layers: int, forget: Sequence[str] = ("pathogen",), quick: bool = False) -> RMUConfig:
    """The main RMU setting of mechun's analyses on the organism (rmu-shallow, depth, sae-unlearning): one layer
    below the middle, c = 5x the mean forget-token norm, alpha 100, lr 1e-3, batch 16, 150 steps (120 with
    ``quick``).

    Chosen on the v2 main organism (seed 0) with RMU seeds 100-102, which no report uses, by a rule fixed before
    the runs: the weakest of {150 steps, 250 steps, 250 steps at c = 10x} whose mean forget trained-template
    accuracy is at most chance + 0.1 and whose retain accuracy is at least 0.95x the base's. 150 steps: forget
    0.04 (0.00 / 0.01 / 0.10), retain 0.995 (base 0.999); 250 steps: 0.02, 0.997; c = 10x: 0.00, 0.968.
    The same rule and seeds on the trainer-v3 organism pick it again: 150 steps forget 0.056 (0.00 / 0.00 / 0.16),
    retain 0.997 (base 1.000); 250 steps 0.024, 0.998; c = 10x 0.000, 0.979. And on the trainer-v4 organism: 150 steps
    forget 0.032 (0.00 / 0.06 / 0.04), retain 0.999 (base 1.000); 250 steps 0.023, 0.999; c = 10x 0.014, 0.995.
    And on trainer v5: 150 steps forget 0.004 (0.00 / 0.01 / 0.00), retain 0.985 (base 0.999); 250 steps 0.000,
    0.990; c = 10x 0.000, 0.963. And on trainer v6: 150 steps forget 0.014 (0.00 / 0.03 / 0.01), retain 1.000
    (base 1.000); 250 steps 0.003, 1.000; c = 10x 0.000, 0.996."""
    return RMUConfig(list(forget), layer=max(1, n_layers // 2 - 1), steps=120 if quick else 150, alpha=100.0,
                     lr=1e-3, auto_coeff_mult=5.0, batch_size=16)


@dataclass
class RMUResult:
    config: RMUConfig
    steering: dict[str, Tensor]  # domain -> c * u
    losses: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "steering_coeff": self.config.steering_coeff,
                "steering_vectors": {k: v.tolist() for k, v in self.steering.items()}, "losses": self.losses}


def mlp_out_weight(model: Model, layer: int) -> torch.nn.Parameter:
    """The MLP output matrix of a layer (GPT-2 ``mlp.c_proj``, Llama/Mistral/Gemma ``mlp.down_proj``)."""
    mlp = model.blocks[check_layer(model, layer)].mlp
    out = getattr(mlp, "out", None)
    if out is None:
        raise MechunError(f"cannot find the MLP output projection of layer {layer} for this architecture")
    return getattr(out, "_original_component", out).weight


def layer_activations(model: Model, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"],
                      layer: int) -> Float[Tensor, "batch pos d_model"]:
    """``blocks.{layer}.hook_resid_post`` with gradients (the forward stops after ``layer``).

    This runs the bare HF modules (so gradients reach fused weights such as GPT-2's ``c_attn``), which bypass the
    bridge's hook points; it refuses to run while any module of the bridge has a hook (a ``project_out`` or a user hook would
    otherwise be silently ignored)."""
    _refuse_hooks(model)
    return _layer_activations(model, ids, mask, layer)


def _refuse_hooks(model: Model) -> None:
    if foreign_hooks_present(model):
        raise MechunError("RMU trains through the bare HF modules, which would ignore the hooks now active on the "
                          "model (e.g. a project_out or sae_intervention context); leave that context first")


def _layer_activations(model: Model, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"],
                       layer: int) -> Float[Tensor, "batch pos d_model"]:
    """:func:`layer_activations` without the hook check (a training loop checks once, before its first step)."""
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


def masked_mse(act: Float[Tensor, "batch pos d_model"], target: Float[Tensor, "*batch d_model"],
               mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Mean squared error over the real tokens (``mask``) and every model dimension; padding contributes nothing.
    ``target`` is an activation of the same shape, or one vector broadcast over every token."""
    m = mask.to(act.device, act.dtype)[..., None]
    return (((act - target) ** 2) * m).sum() / (m.sum() * act.shape[-1])


class RMULoss(NamedTuple):
    total: Float[Tensor, ""]
    forget: Float[Tensor, ""]
    retain: Float[Tensor, ""]  # already multiplied by alpha


def rmu_loss(h_forget: Float[Tensor, "batch pos d_model"], forget_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"],
             steering: Float[Tensor, " d_model"], h_retain: Float[Tensor, "batch2 pos2 d_model"],
             h_frozen: Float[Tensor, "batch2 pos2 d_model"],
             retain_mask: Int[Tensor, "batch2 pos2"] | Bool[Tensor, "batch2 pos2"], alpha: float) -> RMULoss:
    """RMU's loss (Li et al. 2024, WMDP, eq. 1-3) at the RMU layer:

        forget = MSE(h_forget, c u)            over forget tokens (the steering vector ``c u`` at every token)
        retain = alpha * MSE(h_retain, h_frozen)  over retain tokens (the frozen model's activations)
        total  = forget + retain

    MSE averages over real tokens and model dimensions (WMDP's code averages over padding too; mechun masks it)."""
    forget = masked_mse(h_forget, steering.to(h_forget), forget_mask)
    retain = alpha * masked_mse(h_retain, h_frozen.to(h_retain), retain_mask)
    return RMULoss(forget + retain, forget, retain)


def steering_vectors(d: int, domains: Sequence[str], coeff: float, seed: int) -> dict[str, Float[Tensor, " d"]]:
    """One RMU steering vector ``c u`` per forget domain: ``u`` uniform in [0, 1)^d, normalised (as in WMDP)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for dom in domains:
        u = torch.rand(d, generator=gen)
        out[dom] = u / u.norm() * coeff
    return out


def rmu_unlearn(
    model: Model,
    frozen: Model,
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

    _refuse_hooks(model)
    _refuse_hooks(frozen)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [mlp_out_weight(model, x) for x in cfg.update_layers]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    result = RMUResult(cfg, steer)
    model.train(False)
    try:
        for step in progress_bar(range(cfg.steps), desc=f"RMU (layer {layer}, c={cfg.steering_coeff:g})", disable=not progress,
                         mininterval=1.0):
            dom = cfg.forget_domains[step % len(cfg.forget_domains)]
            f_ids, f_mask = tokenize(model, rng.sample(list(forget_texts[dom]), min(cfg.batch_size,
                                                                                     len(forget_texts[dom]))))
            r_ids, r_mask = tokenize(model, rng.sample(list(retain_texts), min(cfg.batch_size, len(retain_texts))))
            h_forget = _layer_activations(model, f_ids, f_mask, layer)
            h_retain = _layer_activations(model, r_ids, r_mask, layer)
            with torch.no_grad():
                h_frozen = _layer_activations(frozen, r_ids, r_mask, layer)
            loss = rmu_loss(h_forget, f_mask, steer[dom], h_retain, h_frozen, r_mask, cfg.alpha)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            result.losses.append({"forget": loss.forget.item(), "retain": loss.retain.item()})
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return result


def save_unlearned(model: Model, result: RMUResult, out_dir: str | Path, extra: Mapping[str, Any] | None = None,
                   files: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save the unlearned model as a local HF checkpoint dir with ``rmu.json`` (hyper-parameters, steering vectors,
    ``extra``) and any other JSON ``files`` (e.g. ``world.json``), all written atomically together."""
    return save_model(model, out_dir, extra_files={"rmu.json": {**result.to_json(), **(extra or {})}, **(files or {})},
                      overwrite=overwrite)


def load_steering(model_dir: str | Path, d_model: int | None = None) -> dict[str, Tensor]:
    """The steering vectors of ``rmu.json`` (forget domain -> ``d_model`` vector), checked: one finite vector of
    ``d_model`` numbers per domain, else a :class:`DamagedFileError` naming the file."""
    p = Path(model_dir) / "rmu.json"
    if not p.is_file():
        raise MechunError(f"no rmu.json in {model_dir}; was it made by mechun rmu?")
    try:
        vectors = {k: torch.tensor(v, dtype=torch.float32)
                   for k, v in json.loads(p.read_text())["steering_vectors"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedFileError(f"{p} is damaged ({type(e).__name__}: {e}); re-run mechun rmu") from e
    for k, v in vectors.items():
        if v.ndim != 1 or (d_model is not None and v.numel() != d_model) or not bool(torch.isfinite(v).all()):
            raise DamagedFileError(f"{p}: the steering vector for {k!r} has shape {tuple(v.shape)}"
                                   f"{f', not ({d_model},)' if d_model else ''} or non-finite values; the file is "
                                   "damaged or belongs to another model: re-run mechun rmu")
    return vectors
