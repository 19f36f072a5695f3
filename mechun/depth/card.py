"""The depth card as types: one dataclass per section, each with ``to_json()`` and ``from_json()``.

The JSON layout is the one ``card.json`` and the analyses' ``results.json`` have always had (a section that was not
measured is ``{"skipped": reason}``); :func:`aggregate_cards` adds ``summary``, ``per_seed`` and ``n_seeds``.
A seed-mean card is a card too: numbers are averaged, so counts and layers may be fractional there, and strings that
differ between seeds (fingerprints, paths) become lists.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from mechun.errors import MechunError
from mechun.stats import aggregate_json

Num = int | float
Text = str | list[str]  # a string, or one per seed in a seed-mean card
T = TypeVar("T")


class _JSON:
    """``to_json`` / ``from_json`` for a dataclass of JSON values and nested sections."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls: type[T], data: Mapping[str, Any]) -> T:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _load(hints[k], v) for k, v in data.items() if k in known})


def _dump(v: Any) -> Any:
    if isinstance(v, _JSON):
        return v.to_json()
    if isinstance(v, Mapping):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


def _load(hint: Any, v: Any) -> Any:
    """Build ``hint`` (a section class, ``X | Skipped``, ``dict[str, X]``, ``list[X]``, ``tuple``) from JSON."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        sections = [a for a in args if isinstance(a, type) and issubclass(a, _JSON)]
        if isinstance(v, Mapping) and sections:
            if Skipped in sections and "skipped" in v:
                return Skipped.from_json(v)
            other = [a for a in sections if a is not Skipped]
            return _load(other[0], v) if other else v
        return v
    if isinstance(hint, type) and issubclass(hint, _JSON):
        return hint.from_json(v)
    if origin is dict and isinstance(v, Mapping):
        return {k: _load(args[1], x) for k, x in v.items()}
    if origin is tuple and isinstance(v, list):
        return tuple(v)
    return v


@dataclass
class Skipped(_JSON):
    """A section that was not measured, and why."""

    skipped: str


@dataclass
class FormatAccuracy(_JSON):
    base: float
    unlearned: float
    chance: float
    removed_share: float  # share of the base's above-chance accuracy that unlearning removed (1 = down to chance)


@dataclass
class McqAllOrders(_JSON):
    n_robust_in_base: Num  # forget questions the base answers right in every option order
    n_questions: Num
    unlearned_accuracy_all_orders: float | None = None
    unlearned_robust: float | None = None

    def to_json(self) -> dict[str, Any]:  # the accuracies exist only when some question was robust
        return {k: v for k, v in super().to_json().items() if v is not None}


@dataclass
class Behaviour(_JSON):
    accuracy: dict[str, dict[str, dict[str, float]]]  # model ("base", "unlearned") -> group -> format -> accuracy
    forget: dict[str, FormatAccuracy]  # format -> accuracies on the forget domain
    mcq_all_orders: McqAllOrders


@dataclass
class JunkSection(_JSON):
    layer: int | list[int]  # a seed-mean card lists each seed's layer where they differ
    norm_ratio_forget: list[float]
    norm_ratio_retain: list[float]
    cos_with_steering: list[float] | None  # per layer; None when the steering vector is unknown
    ablated_accuracy: dict[str, float]
    ablated_retain_accuracy: dict[str, float]
    recovery_by_format: dict[str, float]
    control_recovery: dict[str, float]  # the random-direction control


@dataclass
class ProbeSection(_JSON):
    base: dict[str, Any]  # mechun.representation.ProbeRecoverability.to_json()
    unlearned: dict[str, Any]
    best_base: float
    best_unlearned: float
    retained_share: float  # share of the base's above-chance decodability left in the unlearned model


@dataclass
class RelearningSection(_JSON):
    steps: list[Num]
    held_out_accuracy: list[float]
    relearned_accuracy: list[float]
    regained_share: list[float]
    peak_regained_share: float
    base_held_out_accuracy: float
    chance: float
    n_relearn_prompts: Num
    n_held_out_prompts: Num


@dataclass
class CKASection(_JSON):
    forget: list[float]
    retain: list[float]


@dataclass
class Specificity(_JSON):
    nkl_static: float
    nkl_dynamic: float
    retain_accuracy: dict[str, dict[str, float]]  # "static"/"dynamic" -> "base"/"unlearned" -> accuracy
    nkl_filler: float | None = None  # organism cards: NKL on filler text


@dataclass
class Verdict(_JSON):
    removed: list[str]
    hidden: list[str]
    kept: list[str]
    line: str
    thresholds: dict[str, float]


@dataclass
class DepthCard(_JSON):
    """One (base, unlearned) pair's card; see :mod:`mechun.depth` for what each section measures."""

    method: Text
    config: dict[str, Any]  # the DepthConfig, as JSON
    intervention: bool | list[bool]
    fingerprints: dict[str, Text]
    forget_domain: str
    primary_format: str  # the format whose forgetting the recovery tests are about ("train"; "mcq" for benchmarks)
    behaviour: Behaviour
    junk: JunkSection
    probes: ProbeSection | Skipped
    relearning: RelearningSection | Skipped
    cka: CKASection
    specificity: Specificity
    verdict: Verdict | None = None
    seconds: Num = 0.0
    models: dict[str, Text] = field(default_factory=dict)  # checkpoint paths, where known

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("DepthCard", method=self.method, forget_domain=self.forget_domain,
                          verdict=self.verdict.line if self.verdict else None)

    def _repr_html_(self) -> str:
        from mechun.depth.report import card_html

        return card_html(self)


def summary_row(card: DepthCard) -> dict[str, float]:
    """The card's headline numbers, one flat row (for comparison tables and seed aggregation)."""
    nan = float("nan")
    pr, rl, spec = card.probes, card.relearning, card.specificity
    row = {f"forget {f}": a.unlearned for f, a in card.behaviour.forget.items()}
    row["junk recovery"] = card.junk.recovery_by_format[card.primary_format]
    row["probe best (unl.)"] = pr.best_unlearned if isinstance(pr, ProbeSection) else nan
    row["probe best (base)"] = pr.best_base if isinstance(pr, ProbeSection) else nan
    row["relearn regained (peak)"] = rl.peak_regained_share if isinstance(rl, RelearningSection) else nan
    row["CKA forget (min)"] = min(card.cka.forget)
    row["CKA retain (min)"] = min(card.cka.retain)
    row["retain acc. static"] = spec.retain_accuracy["static"]["unlearned"]
    row["retain acc. dynamic"] = spec.retain_accuracy["dynamic"]["unlearned"]
    row["NKL retain"] = spec.nkl_static
    row["NKL dynamic"] = spec.nkl_dynamic
    return row


#: Keys whose numbers name something (a layer, a seed) rather than measure it: kept when equal, else listed, never
#: averaged (a mean junk layer of 0.67 names no layer).
_IDENTITY_KEYS = frozenset({"layer", "junk_layer", "seed"})


def _same_or_listed(items: Sequence[Any]) -> Any:
    """The items' common value, or all of them in a list where they differ."""
    return items[0] if all(x == items[0] for x in items) else list(items)


def _tree_mean(items: Sequence[Any]) -> Any:
    """Elementwise mean of structurally equal JSON trees: numbers averaged (NaN ignored), lists of equal length
    element by element, dicts key by key; other leaves, and the values under :data:`_IDENTITY_KEYS`, kept when
    equal across items, else listed."""
    first = items[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return _same_or_listed(items)
    if isinstance(first, int) and all(type(x) is int and x == first for x in items):
        return first  # step counts equal across seeds: keep them integers
    if isinstance(first, (int, float)):
        vals = [float(x) for x in items if x is not None and not (isinstance(x, float) and math.isnan(x))]
        return statistics.fmean(vals) if vals else float("nan")
    if isinstance(first, Mapping):
        keys = [k for k in first if all(isinstance(x, Mapping) and k in x for x in items)]
        return {k: (_same_or_listed if k in _IDENTITY_KEYS else _tree_mean)([x[k] for x in items]) for k in keys}
    if isinstance(first, (list, tuple)):
        if all(isinstance(x, (list, tuple)) and len(x) == len(first) for x in items):
            return [_tree_mean([x[i] for x in items]) for i in range(len(first))]
        return list(items)
    return first


@dataclass
class SeedMeanCard(_JSON):
    """Several seeds' cards of one method: the seed-mean card (same layout, verdict recomputed from the means),
    ``summary`` (mean, std and per-seed value of each headline number, from :mod:`mechun.stats`) and the cards."""

    mean: DepthCard
    summary: dict[str, dict[str, Any]]
    per_seed: list[DepthCard]

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("SeedMeanCard", method=self.mean.method, n_seeds=len(self.per_seed),
                          verdict=self.mean.verdict.line if self.mean.verdict else None)

    def _repr_html_(self) -> str:
        from mechun.depth.report import card_html

        return card_html(self)

    def to_json(self) -> dict[str, Any]:
        return {**self.mean.to_json(), "summary": self.summary, "per_seed": [c.to_json() for c in self.per_seed],
                "n_seeds": len(self.per_seed)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeedMeanCard:
        return cls(DepthCard.from_json(data), dict(data["summary"]),
                   [DepthCard.from_json(c) for c in data["per_seed"]])


def aggregate_cards(cards: Sequence[DepthCard]) -> SeedMeanCard:
    """One card for several seeds (see :class:`SeedMeanCard`)."""
    from mechun.depth.verdict import verdict

    if not cards:
        raise MechunError("no cards to aggregate")
    for what, values in (("method", [c.method for c in cards]), ("forget domain", [c.forget_domain for c in cards]),
                         ("primary format", [c.primary_format for c in cards]),
                         ("base model", [c.fingerprints.get("base") for c in cards])):
        other = next((v for v in values if v != values[0]), values[0])
        if other != values[0]:
            raise MechunError(f"the cards differ in {what} ({values[0]!r} vs {other!r}); a seed mean takes the "
                              "cards of one method, base model and forget domain -- aggregate each group on its own")
    mean = DepthCard.from_json(_tree_mean([{k: v for k, v in c.to_json().items() if k != "verdict"}
                                           for c in cards]))
    mean.verdict = verdict(mean)
    return SeedMeanCard(mean, aggregate_json([summary_row(c) for c in cards]), list(cards))
