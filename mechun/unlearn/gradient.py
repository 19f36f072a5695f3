"""Gradient unlearning methods on a forget corpus: gradient ascent, gradient difference, NPO, SimNPO.

One training loop (:func:`gradient_unlearn`) serves every method: each step samples a batch of forget texts (and of
retain texts where the method has a retain term), computes each sequence's summed log-likelihood through the bare
Hugging Face modules (:func:`mechun.unlearn.losses.token_logprobs`), and takes one AdamW step on the method's loss
(:mod:`mechun.unlearn.losses`). ``components`` restricts the trained parameters to some MLP / attention blocks
(localized unlearning with any of these objectives); every other parameter stays bit-identical.

Like WMDP's corpora, the forget and retain texts are passages (:meth:`mechun.organism.world.World.corpora`): the
loss covers every token of a passage, not only the answers.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechun.edit import Component, ParameterMask, _freeze_all_but, _trainable, component_mask, full_mask
from mechun.errors import MechunError
from mechun.models import (
    Model,
    bare_forward_view,
    foreign_hooks_present,
    model_device,
    model_fingerprint,
    tokenize,
)
from mechun.progress import progress_bar
from mechun.unlearn.losses import (
    ga_loss,
    graddiff_loss,
    mean_token_nll,
    npo_loss,
    simnpo_loss,
    token_logprobs,
)


@dataclass
class GradientConfig(ABC):
    """What every gradient method shares. ``alpha`` weighs the retain cross-entropy (methods without a retain term
    ignore it); ``components`` (``[("mlp", 1), ...]``) limits training to those blocks (``None``: every weight)."""

    method: ClassVar[str] = ""
    uses_retain: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False

    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 8
    alpha: float = 1.0
    seed: int = 0
    components: list[Component] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("steps", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MechunError(f"{name}.{f} must be an integer >= 1, got {v!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("float",) and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise MechunError(f"{name}.{f.name} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise MechunError(f"{name}.lr must be > 0, got {self.lr!r}")
        if not self.alpha >= 0:
            raise MechunError(f"{name}.alpha must be >= 0, got {self.alpha!r}")
        if hasattr(self, "beta") and not self.beta > 0:
            raise MechunError(f"{name}.beta must be > 0, got {self.beta!r}")
        if self.components is not None:
            self.components = [(str(k), int(layer)) for k, layer in self.components]  # type: ignore[misc]
            if not self.components:
                raise MechunError(f"{name}.components is empty; pass None to train every weight")

    @abstractmethod
    def loss(self, forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor] | None,
             ref_logp: Tensor | None) -> Float[Tensor, ""]:
        """The method's objective from (log-likelihood, token count) of the forget and retain batches and the
        reference's forget log-likelihoods (each subclass: one function of :mod:`mechun.unlearn.losses`)."""

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass
class GradAscentConfig(GradientConfig):
    """Gradient ascent on the forget corpus (:func:`mechun.unlearn.losses.ga_loss`); no retain term."""

    method: ClassVar[str] = "grad_ascent"
    uses_retain: ClassVar[bool] = False

    def loss(self, forget, retain, ref_logp):
        return ga_loss(*forget)


@dataclass
class GradDiffConfig(GradientConfig):
    """Gradient difference (:func:`mechun.unlearn.losses.graddiff_loss`)."""

    method: ClassVar[str] = "grad_diff"

    def loss(self, forget, retain, ref_logp):
        return graddiff_loss(*forget, *retain, alpha=self.alpha)


@dataclass
class NPOConfig(GradientConfig):
    """NPO against the frozen base model (:func:`mechun.unlearn.losses.npo_loss`), plus ``alpha`` x retain CE."""

    method: ClassVar[str] = "npo"
    needs_reference: ClassVar[bool] = True
    beta: float = 0.1

    def loss(self, forget, retain, ref_logp):
        out = npo_loss(forget[0], ref_logp, self.beta)
        return out + self.alpha * mean_token_nll(*retain) if self.alpha else out


@dataclass
class SimNPOConfig(GradientConfig):
    """SimNPO (:func:`mechun.unlearn.losses.simnpo_loss`), plus ``alpha`` x retain CE."""

    method: ClassVar[str] = "simnpo"
    beta: float = 2.5
    gamma: float = 0.0

    def loss(self, forget, retain, ref_logp):
        out = simnpo_loss(*forget, beta=self.beta, gamma=self.gamma)
        return out + self.alpha * mean_token_nll(*retain) if self.alpha else out


GRADIENT_METHODS: dict[str, type[GradientConfig]] = {
    c.method: c for c in (GradAscentConfig, GradDiffConfig, NPOConfig, SimNPOConfig)}


@dataclass
class GradientResult:
    config: GradientConfig
    mask: ParameterMask
    losses: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.config.to_json(), "trained": {"label": self.mask.label, "n_params": self.mask.n_params},
                "final_loss": self.losses[-1] if self.losses else None}


def sequence_logprobs(model: Model, texts: Sequence[str]) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
    """Each text's summed token log-likelihood (differentiable) and token count, through the bare HF modules."""
    bare, _ = bare_forward_view(model)
    ids, mask = tokenize(model, list(texts))
    dev = model_device(model)
    logits = bare(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    return token_logprobs(logits, ids, mask)


def gradient_unlearn(model: Model, config: GradientConfig, forget: Sequence[str], retain: Sequence[str] = (),
                     reference: Model | None = None, progress: bool = False) -> GradientResult:
    """Unlearn ``forget`` from ``model`` in place with ``config``'s method. ``reference`` (a second copy of the
    base model, never changed) is needed by NPO. Returns the loss history."""
    if not isinstance(config, GradientConfig) or not config.method:
        raise MechunError(f"config must be one of {', '.join(c.__name__ for c in GRADIENT_METHODS.values())}")
    if not forget:
        raise MechunError("empty forget corpus: pass at least one forget text")
    if config.uses_retain and config.alpha > 0 and not retain:
        raise MechunError(f"{config.method} has a retain term (alpha={config.alpha:g}) but the retain corpus is "
                          "empty: pass retain texts or alpha=0")
    if config.needs_reference:
        if reference is None:
            raise MechunError(f"{config.method} needs the frozen base model as reference: load the base checkpoint "
                              "a second time and pass it as reference")
        if model_fingerprint(reference) != model_fingerprint(model):
            raise MechunError("the reference must start as the same weights as the model (load the base twice)")
    for m in (model, reference):
        if m is not None and foreign_hooks_present(m):
            raise MechunError("gradient unlearning trains through the bare HF modules, which would ignore the hooks "
                              "now active on the model; leave that intervention context first")
    mask = full_mask(model) if config.components is None else component_mask(model, config.components, "localized")
    bare, _ = bare_forward_view(model)
    params = _trainable(bare, mask)
    old = _freeze_all_but(bare, params)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    result = GradientResult(config, mask)
    use_retain = config.uses_retain and config.alpha > 0
    try:
        for _ in progress_bar(range(config.steps), desc=config.method, disable=not progress, mininterval=1.0):
            f_texts = rng.sample(list(forget), min(config.batch_size, len(forget)))
            f = sequence_logprobs(model, f_texts)
            r = sequence_logprobs(model, rng.sample(list(retain), min(config.batch_size, len(retain)))) \
                if use_retain else None
            ref = None
            if config.needs_reference:
                with torch.no_grad():
                    ref = sequence_logprobs(reference, f_texts)[0]
            loss = config.loss(f, r, ref)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"loss": loss.item(), "forget_nll": float(mean_token_nll(*f).detach())}
            if r is not None:
                row["retain_nll"] = float(mean_token_nll(*r).detach())
            result.losses.append(row)
            if not math.isfinite(row["loss"]):
                raise MechunError(f"{config.method}: the loss became {row['loss']} at step {len(result.losses)}; "
                                  "lower lr")
    finally:
        for p, flag in old.items():
            p.requires_grad_(flag)
            p.grad = None
    return result
