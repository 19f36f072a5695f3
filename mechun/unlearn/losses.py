"""The unlearning objectives as pure functions of per-sequence log-likelihoods.

Every gradient method of :mod:`mechun.unlearn.gradient` computes, per forget (and retain) sequence, the summed
log-probability of its tokens ``logp`` and their number ``n`` (:func:`sequence_logprobs`), then one of:

* **Gradient ascent** (:func:`ga_loss`; Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in
  Language Models"): minimise the negated language-modelling loss, ``Σ logp / Σ n`` -- the mean token
  log-likelihood of the forget batch, pushed down without bound.
* **Gradient difference** (:func:`graddiff_loss`; Liu et al. 2022, "Continual Learning and Private Unlearning";
  TOFU's GradDiff): gradient ascent on the forget batch plus ``alpha`` times the ordinary cross-entropy on a
  retain batch.
* **NPO** (:func:`npo_loss`; Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to
  Effective Unlearning", eq. 3): ``-(2/β) E[log σ(-β (log π_θ(y|x) - log π_ref(y|x)))]`` over forget sequences,
  with the frozen base model as ``π_ref``. Bounded below by 0 and with a gradient that vanishes once a sequence is
  already much less likely than under the reference -- what stops GA's collapse.
* **SimNPO** (:func:`simnpo_loss`; Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference
  Optimization for LLM Unlearning", eq. 4): reference-free and length-normalised,
  ``-(2/β) E[log σ(-(β/|y|) log π_θ(y|x) - γ)]``. (open-unlearning writes the margin as ``δ = γ/β``.)

NPO and SimNPO add ``alpha`` times the retain cross-entropy when ``alpha > 0`` (the papers' "+RT" variants and
open-unlearning's default). Each function is checked against a hand computation on a two-sequence batch in
``tests/test_unlearn.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechun.errors import MechunError


def mean_token_nll(logp: Float[Tensor, " n"], n: Int[Tensor, " n"]) -> Float[Tensor, ""]:
    """The usual language-modelling loss of a batch: summed negative log-likelihood over all its tokens, divided by
    the number of tokens (what Hugging Face's ``labels=`` loss returns)."""
    return -logp.sum() / n.sum()


def ga_loss(logp: Float[Tensor, " n"], n: Int[Tensor, " n"]) -> Float[Tensor, ""]:
    """Gradient ascent: the negated language-modelling loss of the forget batch, ``Σ logp / Σ n``."""
    return -mean_token_nll(logp, n)


def graddiff_loss(forget_logp: Float[Tensor, " n"], forget_n: Int[Tensor, " n"], retain_logp: Float[Tensor, " m"],
                  retain_n: Int[Tensor, " m"], alpha: float = 1.0) -> Float[Tensor, ""]:
    """Gradient difference: ``ga_loss(forget) + alpha * mean_token_nll(retain)``."""
    return ga_loss(forget_logp, forget_n) + alpha * mean_token_nll(retain_logp, retain_n)


def npo_loss(logp: Float[Tensor, " n"], ref_logp: Float[Tensor, " n"], beta: float = 0.1) -> Float[Tensor, ""]:
    """NPO: ``-(2/β) mean log σ(-β (logp - ref_logp))``, ``logp`` and ``ref_logp`` the summed log-likelihoods of
    each forget sequence under the model and under the frozen reference. At the start (``logp == ref_logp``) it is
    ``(2/β) log 2``."""
    _check_beta(beta)
    return -(2 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo_loss(logp: Float[Tensor, " n"], n: Int[Tensor, " n"], beta: float = 2.5, gamma: float = 0.0,
                ) -> Float[Tensor, ""]:
    """SimNPO: ``-(2/β) mean log σ(-(β/|y|) logp - γ)``, ``|y| = n`` the sequence's token count."""
    _check_beta(beta)
    return -(2 / beta) * F.logsigmoid(-(beta / n.to(logp.dtype)) * logp - gamma).mean()


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise MechunError(f"beta must be > 0, got {beta!r}")


def token_logprobs(logits: Float[Tensor, "batch pos vocab"], ids: Int[Tensor, "batch pos"],
                   mask: Int[Tensor, "batch pos"]) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Per sequence, the summed log-probability of every token after the first (each predicted from the ones
    before it) and how many there are; padding (``mask == 0``) counts for nothing."""
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]
    keep = mask[:, 1:].to(logits.device).bool()
    return torch.where(keep, logp, torch.zeros_like(logp)).sum(1), keep.sum(1)
