"""The depth benchmark: which measure tells knowledge *removed* from knowledge *hidden*?

Ground truth comes from the retain oracle (:func:`mechun.organism.train.train_organism` with ``without``): fine-tune
the unlearned model and the oracle the same way on half the forget facts (by subject) and measure both on the other
half along the way. The oracle never knew those facts, so whatever the unlearned model shows beyond it is knowledge
that was still there: :func:`relearn_advantage` (the largest held-out accuracy gap, unlearned minus oracle, at equal
relearning steps).

Every depth measure (:func:`checkpoint_measures`) is oriented *a priori* so that a higher value claims more
knowledge remains (``1 - UDS``, probe accuracy, CKA with the base, junk recovery, ...), then scored against that
ground truth over many unlearned checkpoints (:func:`score_measures`): AUC for "advantage above the median" (with a
bootstrap interval over checkpoints; on the v2 organism every checkpoint relearns far beyond the oracle, so an
absolute "knowledge left" cut would leave no negatives), Spearman's rho with the advantage, and the AUC with each
method left out (robustness to the method mix). An AUC below 0.5 is a measure pointing the wrong way; it is reported as is.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mechun.depth.checkpoint import state_measures
from mechun.depth.measure import relearn_split
from mechun.edit import relearn
from mechun.evaluate import answer_scores, cloze_accuracy, mcq_permutation_scores
from mechun.models import Model, model_fingerprint
from mechun.organism.world import World, retain_domains
from mechun.representation import probe_recoverability

#: What each measure is and which way it points (every one: higher = more knowledge left).
MEASURES: dict[str, str] = {
    "forget_accuracy": "trained-template cloze accuracy on the forget facts (behaviour)",
    "paraphrase_accuracy": "held-out-template cloze accuracy on the forget facts (behaviour)",
    "answer_logprob": "mean log-probability of the true answers (behaviour, graded)",
    "mcq_all_orders": "MCQ accuracy over all 24 option orders on the forget facts never seen in MCQ form",
    "uds": "1 - UDS (patching the unlearned model's states into the full model; UDS paper)",
    "probe": "held-out-subject linear probe accuracy, best layer",
    "cka": "linear CKA of forget-prompt residuals with the base model, mean over layers",
    "junk_recovery": "accuracy regained by projecting out the mean unlearned-minus-base direction",
    "logit_lens": "best-layer logit-lens accuracy of the true answer (the model's own unembedding)",
    "norm_ratio": "-(peak forget-prompt residual norm ratio, unlearned / base)",
}


def relearn_curve(model: Model, world: World, forget: str, steps: Sequence[int], lr: float = 1e-3,
                  seed: int = 0) -> list[float]:
    """Held-out accuracy while fine-tuning ``model`` (in place: pass a copy) on the other half of the forget facts."""
    train, held = relearn_split(world, forget, seed)
    return relearn(model, train, held, steps, lr=lr, seed=seed).held_out_accuracy


def relearn_advantage(unlearned_curve: Sequence[float], oracle_curve: Sequence[float]) -> float:
    """The ground truth: the largest gap in held-out accuracy, unlearned minus oracle, at the same relearning step
    (step 0 included). The maximum, not the last step: fine-tuning on some facts at a high rate also disturbs the
    others, so a model that still knows everything can end lower than it started."""
    return max(float(u - o) for u, o in zip(unlearned_curve, oracle_curve, strict=True))


def checkpoint_measures(base: Model, unlearned: Model, oracle: Model, world: World, forget: str,
                        probe_steps: int = 200, seed: int = 0, uds_prompts: int = 96) -> dict[str, float]:
    """Every measure of :data:`MEASURES` for one unlearned checkpoint (higher = more knowledge left): the organism's
    labelled ones here, the text-only ones from :func:`mechun.depth.checkpoint.state_measures`; ``base`` is the full
    model UDS patches into. Nothing here changes a weight (checked)."""
    from mechun.models import word_ids

    fingerprints = [model_fingerprint(m) for m in (base, unlearned, oracle)]
    prompts = world.prompts(forget)
    texts = [p.text for p in prompts]
    retain_texts = [p.text for d in retain_domains() for p in world.prompts(d)[::4]]
    out: dict[str, float] = {}
    correct, logp = answer_scores(unlearned, texts, [p.answer for p in prompts])  # one forward for both
    out["forget_accuracy"], out["answer_logprob"] = float(correct.float().mean()), float(logp.mean())
    out["paraphrase_accuracy"] = cloze_accuracy(unlearned, world.prompts(forget, "paraphrase"))
    out["mcq_all_orders"] = mcq_permutation_scores(unlearned, world.mcq(forget, seed=1)).accuracy
    probe_ps = prompts + world.prompts(forget, "paraphrase")
    pr = probe_recoverability(unlearned, [p.text for p in probe_ps], [p.fact.subject for p in probe_ps],
                              [p.answer for p in probe_ps], seed=seed, steps=probe_steps)
    out["probe"] = max(pr.accuracy)
    one_per_fact = prompts[::len(prompts) // len(world.facts_of(forget))][:uds_prompts]
    state, _, _ = state_measures(
        base, oracle, unlearned, texts, retain_texts,
        ([p.text for p in one_per_fact], [p.answer for p in one_per_fact]),
        ([p.text for p in one_per_fact], [word_ids(unlearned, p.answer, "answer")[0] for p in one_per_fact]),
        lambda m: cloze_accuracy(m, prompts), out["forget_accuracy"])
    out |= state
    assert [model_fingerprint(m) for m in (base, unlearned, oracle)] == fingerprints, "a measure changed weights"
    return out


# -- scoring ----------------------------------------------------------------------------------------------------------
def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney: the chance a positive outranks a negative, ties count half); NaN
    without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def bootstrap_ci(stat: Callable[[list[int]], float], n: int, reps: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``reps`` resamples (with replacement) of ``n`` items; draws
    where the statistic is undefined (NaN) are skipped."""
    rng = random.Random(seed)
    vals = sorted(v for v in (stat([rng.randrange(n) for _ in range(n)]) for _ in range(reps)) if not math.isnan(v))
    if not vals:
        return (math.nan, math.nan)
    lo, hi = vals[int((1 - level) / 2 * (len(vals) - 1))], vals[int((1 + level) / 2 * (len(vals) - 1))]
    return (lo, hi)


def median(values: Sequence[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def score_measures(rows: Sequence[Mapping[str, Any]], measures: Sequence[str], threshold: float | None = None,
                   reps: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each measure against the ground truth over ``rows`` (one per checkpoint, with ``"method"``,
    ``"advantage"`` and every measure): AUC for ``advantage > threshold`` (default: the median advantage, so both
    classes exist: "more knowledge left than the typical checkpoint") with a bootstrap interval, Spearman's rho
    with the advantage (with its interval), and the AUC with each method left out."""
    truth = [float(r["advantage"]) for r in rows]
    threshold = median(truth) if threshold is None else threshold
    labels = [t > threshold for t in truth]
    out: dict[str, dict[str, Any]] = {}
    for name in measures:
        keep = [i for i, r in enumerate(rows) if not math.isnan(float(r[name]))]
        out[name] = _score_one([float(rows[i][name]) for i in keep], [labels[i] for i in keep],
                               [truth[i] for i in keep], [rows[i]["method"] for i in keep], reps, seed) | {
            "threshold": threshold}
    return out


def _score_one(x: list[float], y: list[bool], t: list[float], method: list[str], reps: int, seed: int,
               ) -> dict[str, Any]:
    without = {m: auc([v for v, k in zip(x, method, strict=True) if k != m],
                      [v for v, k in zip(y, method, strict=True) if k != m]) for m in sorted(set(method))}
    worst = [v for v in without.values() if not math.isnan(v)]
    return {
        "auc": auc(x, y), "spearman": spearman(x, t),
        "auc_ci": bootstrap_ci(lambda idx: auc([x[i] for i in idx], [y[i] for i in idx]), len(x), reps, seed),
        "spearman_ci": bootstrap_ci(lambda idx: spearman([x[i] for i in idx], [t[i] for i in idx]), len(x), reps,
                                    seed),
        "auc_without": without, "auc_worst_leave_one_out": min(worst) if worst else math.nan,
        "n": len(x), "n_positive": sum(y),
    }
