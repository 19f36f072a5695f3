"""Representation-level checks: is the forgotten information still *in* the activations?

Behavioural metrics can show forgetting while the residual stream still carries the attribute ("Are we truly
forgetting?", 2025). Two checks, both per layer and both read-only:

* **Probe recoverability** (:func:`probe_recoverability`): a linear probe is trained on the (unlearned) model's
  residual stream at the last prompt token to predict the forgotten attribute, and tested on prompts about
  *held-out subjects*. Held-out subjects matter: with the same subjects on both sides a probe can memorise
  subject -> attribute from subject identity alone, which survives any unlearning. Across subjects, only a shared
  encoding of the attribute (the answer being prepared) decodes. Eight folds over subjects, every prompt tested
  once.
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
from mechun.localize import train_linear_probes
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
    chance: float  # expected accuracy of guessing by the training folds' label frequencies
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


def subject_fold_ids(subjects: Sequence[str], n_folds: int = 2, seed: int = 0) -> list[int]:
    """A k-fold split by subject: each prompt's fold (``0 .. n_folds - 1``; fewer folds if there are fewer
    subjects), all prompts about one subject in the same fold. Subjects are shuffled by ``seed`` and cut into
    contiguous, near-equal blocks."""
    unique = sorted(set(subjects))
    if len(unique) < 2:
        raise MechunError("probing across subjects needs prompts about at least two subjects")
    if n_folds < 2:
        raise MechunError(f"a held-out-subject split needs n_folds >= 2, got {n_folds}")
    random.Random(seed).shuffle(unique)
    k = min(n_folds, len(unique))
    starts = [j * len(unique) // k for j in range(k)]
    fold_of = {s: sum(i >= st for st in starts) - 1 for i, s in enumerate(unique)}
    return [fold_of[s] for s in subjects]


def subject_folds(subjects: Sequence[str], seed: int = 0) -> list[bool]:
    """A two-fold split by subject: ``True`` for prompts whose subject falls in fold 0."""
    return [f == 0 for f in subject_fold_ids(subjects, 2, seed)]


def normalize_rows(x: Float[Tensor, "*n d"]) -> Float[Tensor, "*n d"]:
    """Each row centred and scaled to unit root-mean-square, as a LayerNorm without its affine part: what the
    model's own readout (``ln_final``, then the unembedding) sees of the residual stream."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)


#: Folds over subjects of :func:`probe_recoverability`: each probe is trained on 7/8 of the subjects. With two folds
#: (half the subjects) the main organism's probes read 0.59-0.87 at the last layer, whose unembedding reads 1.00;
#: with eight, 0.77-0.97 (seed 0).
PROBE_FOLDS = 8


def probe_recoverability(model: Model, prompts: Sequence[str], subjects: Sequence[str], labels: Sequence[str],
                         context: Intervention | None = None, seed: int = 0, steps: int = 300,
                         features: Float[Tensor, "layer n d_model"] | None = None,
                         n_folds: int = PROBE_FOLDS) -> ProbeRecoverability:
    """Per layer: a linear probe trained on the prompts of all subjects but one fold's, tested on that fold's
    prompts, for each of ``n_folds`` folds over subjects (:func:`subject_fold_ids`); accuracy over all prompts.

    Features are the residual stream at the last prompt token, row-normalised (:func:`normalize_rows`), then
    standardised by the probe. ``labels`` are the attribute values (strings); ``features`` may be passed to reuse
    a cache (:func:`last_token_features`)."""
    if not (len(prompts) == len(subjects) == len(labels)):
        raise MechunError("pass one subject and one label per prompt")
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    fold = torch.tensor(subject_fold_ids(subjects, n_folds, seed))
    folds = [fold == k for k in range(int(fold.max()) + 1)]  # True: held out in that round
    feats = normalize_rows(features if features is not None else last_token_features(model, prompts,
                                                                                     context=context))
    # baselines: a guess drawn from the training folds' label frequencies (chance; always guessing their most
    # frequent label would score about 0 here, since with evenly spread values that label is the held fold's
    # rarest); and the share of held-out prompts whose label occurs in the training folds at all (the ceiling)
    chance_right, ceiling_right = 0.0, 0
    for held in folds:
        freq = torch.bincount(y[~held], minlength=len(classes)).float() / int((~held).sum())
        chance_right += float(freq[y[held]].sum())
        ceiling_right += int(torch.isin(y[held], y[~held]).sum())
    # one probe per (layer, fold), trained together
    n_layers, k = feats.shape[0], len(folds)
    held = torch.stack(folds)  # fold n
    x = feats.repeat_interleave(k, 0)  # (layer fold) n d
    train = (~held).repeat(n_layers, 1)
    right = (train_linear_probes(x, y, train, len(classes), steps=steps, seed=seed)(x) == y).view(n_layers, k, -1)
    acc = [int(r[held].sum()) / len(y) for r in right]
    tr_acc = [float(sum(r[f][~held[f]].float().mean() for f in range(k)) / k) for r in right]
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
