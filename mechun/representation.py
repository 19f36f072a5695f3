"""Representation-level checks: is the forgotten information still *in* the activations?

Behavioural metrics can show forgetting while the residual stream still carries the attribute ("Are we truly
forgetting?", 2025). Two checks, both per layer and both read-only:

* **Probe recoverability** (:func:`probe_recoverability`): a linear probe is trained on the (unlearned) model's
  residual stream at the last prompt token to predict the forgotten attribute, and tested on prompts about
  *held-out subjects*. Held-out subjects matter: with the same subjects on both sides a probe can memorise
  subject -> attribute from subject identity alone, which survives any unlearning. Across subjects, only a shared
  encoding of the attribute (the answer being prepared) decodes. Two-fold over subjects, folds averaged.
* **CKA** (:func:`linear_cka`, :func:`cka_by_layer`): linear centred kernel alignment between base and unlearned
  activations of the same tokens; 1 means the same geometry up to rotation and scale.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch
from jaxtyping import Float
from torch import Tensor

from mechun.cache import ResidualCache, cache_residuals
from mechun.errors import MechunError
from mechun.interventions import Intervention, applied
from mechun.localize import train_linear_probe
from mechun.models import Model


def last_token_features(model: Model, prompts: Sequence[str], layers: Sequence[int] | None = None,
                        context: Intervention | None = None) -> Float[Tensor, "layer n d_model"]:
    """``resid_post`` at each prompt's last token, per layer (float32). ``context`` (e.g. an SAE intervention) is
    active during the forward."""
    with applied(context):
        return cache_residuals(model, list(prompts), layers=layers, positions="last", progress=False).acts.float()


@dataclass
class ProbeRecoverability:
    """Held-out-subject probe accuracy per layer."""

    accuracy: list[float]
    train_accuracy: list[float]
    chance: float  # accuracy of always predicting the training fold's most frequent label
    ceiling: float  # share of held-out prompts whose label occurs in the training fold (the best any probe can do)
    n_classes: int
    n_prompts: int

    def to_json(self) -> ProbeRecoverabilityJSON:
        return {"accuracy": self.accuracy, "train_accuracy": self.train_accuracy, "chance": self.chance,
                "ceiling": self.ceiling,
                "n_classes": self.n_classes, "n_prompts": self.n_prompts}


class ProbeRecoverabilityJSON(TypedDict):
    """:meth:`ProbeRecoverability.to_json`: its fields, as they are."""

    accuracy: list[float]
    train_accuracy: list[float]
    chance: float
    ceiling: float
    n_classes: int
    n_prompts: int


def subject_folds(subjects: Sequence[str], seed: int = 0) -> list[bool]:
    """A two-fold split by subject: ``True`` for prompts whose subject falls in fold 0."""
    unique = sorted(set(subjects))
    if len(unique) < 2:
        raise MechunError("probing across subjects needs prompts about at least two subjects")
    random.Random(seed).shuffle(unique)
    fold0 = set(unique[: len(unique) // 2])
    return [s in fold0 for s in subjects]


def probe_recoverability(model: Model, prompts: Sequence[str], subjects: Sequence[str], labels: Sequence[str],
                         context: Intervention | None = None, seed: int = 0, steps: int = 300,
                         features: Float[Tensor, "layer n d_model"] | None = None) -> ProbeRecoverability:
    """Per layer: train a linear probe on half the subjects' prompts, test on the other half's, and swap.

    ``labels`` are the attribute values (strings); ``features`` may be passed to reuse a cache
    (:func:`last_token_features`)."""
    if not (len(prompts) == len(subjects) == len(labels)):
        raise MechunError("pass one subject and one label per prompt")
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    fold = torch.tensor(subject_folds(subjects, seed))
    feats = features if features is not None else last_token_features(model, prompts, context=context)
    # baselines: the training fold's most frequent label, predicted for every held-out prompt (chance); and the
    # share of held-out prompts whose label occurs in the training fold at all (no probe can do better)
    chance_right, ceiling_right = 0, 0
    for train in (fold, ~fold):
        majority = int(torch.bincount(y[train], minlength=len(classes)).argmax())
        chance_right += int((y[~train] == majority).sum())
        ceiling_right += int(torch.isin(y[~train], y[train]).sum())
    acc, tr_acc = [], []
    for layer in range(feats.shape[0]):
        x = feats[layer]
        right, tr_right = 0, 0.0
        for train in (fold, ~fold):
            predict = train_linear_probe(x[train], y[train], len(classes), steps=steps, seed=seed)
            right += int((predict(x[~train]) == y[~train]).sum())
            tr_right += float((predict(x[train]) == y[train]).float().mean()) / 2
        acc.append(right / len(y))
        tr_acc.append(tr_right)
    return ProbeRecoverability(acc, tr_acc, chance_right / len(y), ceiling_right / len(y), len(classes), len(prompts))


def linear_cka(x: Float[Tensor, "n_x d_x"], y: Float[Tensor, "n_y d_y"]) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of activations of the same ``n`` inputs."""
    if x.shape[0] != y.shape[0]:
        raise MechunError(f"CKA needs the same inputs on both sides: got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] < 2:
        raise MechunError("CKA needs at least two inputs")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if float(denom) > 0 else float("nan")


def cka_between(base_cache: ResidualCache, unlearned_cache: ResidualCache) -> list[float]:
    """Linear CKA per layer between two ``positions="all"`` caches of the same prompts, over every real token but
    the first (BOS / attention-sink tokens would dominate the kernel)."""
    if base_cache.acts.shape != unlearned_cache.acts.shape or base_cache.mask is None:
        raise MechunError("CKA needs two positions='all' caches of the same prompts from models of the same depth")
    keep = base_cache.mask.clone()
    keep[:, 0] = False
    return [linear_cka(b[keep].float(), u[keep].float()) for b, u in zip(base_cache.acts, unlearned_cache.acts,
                                                                          strict=True)]


def cka_by_layer(base: Model, unlearned: Model, prompts: Sequence[str], context: Intervention | None = None,
                 batch_size: int = 64) -> list[float]:
    """Linear CKA between base and unlearned ``resid_post`` per layer on ``prompts`` (see :func:`cka_between`);
    ``context`` is active for the unlearned model's forward only."""
    cb = cache_residuals(base, list(prompts), positions="all", batch_size=batch_size, progress=False)
    with applied(context):
        cu = cache_residuals(unlearned, list(prompts), positions="all", batch_size=batch_size, progress=False)
    return cka_between(cb, cu)
