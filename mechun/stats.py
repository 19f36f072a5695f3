"""Seed aggregation: the one way mechun turns per-seed numbers into "mean ± std".

Numbers from a CPU run move between machines (the RMU headline moved by eight points on another 2-core machine), so
every analysis reports the mean, the standard deviation *and* every seed's value, computed here and nowhere else.

Conventions:

- NaN values (a measurement that was undefined for that seed, e.g. a recovery fraction when unlearning removed
  nothing) are left out of the mean and std but kept in ``per_seed``;
- ``std`` is the population standard deviation over the seeds that gave a number (0 for one seed);
- with no finite value at all, mean and std are NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


@dataclass(frozen=True)
class SeedStat:
    """One measurement over seeds."""

    mean: float
    std: float
    per_seed: tuple[float | None, ...]

    @property
    def n(self) -> int:
        """How many seeds gave a number (not NaN)."""
        return len(_finite(self.per_seed))

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "per_seed": list(self.per_seed)}

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return "nan" if math.isnan(self.mean) else f"{self.mean:{spec}} ± {self.std:{spec}}"


def seed_stat(values: Sequence[float | None]) -> SeedStat:
    """Mean, std and per-seed values of one measurement (see the module docstring for NaN handling)."""
    ok = _finite(values)
    if not ok:
        return SeedStat(float("nan"), float("nan"), tuple(values))
    return SeedStat(statistics.fmean(ok), statistics.pstdev(ok) if len(ok) > 1 else 0.0, tuple(values))


def over_seeds(rows: Sequence[T], fn: Callable[[T], float | None]) -> SeedStat:
    """``seed_stat([fn(r) for r in rows])``: one number pulled out of each seed's result."""
    return seed_stat([fn(r) for r in rows])


def aggregate(rows: Sequence[Mapping[str, float | None]]) -> dict[str, SeedStat]:
    """Per key of flat per-seed rows (the keys of the first row), the :class:`SeedStat` over the rows."""
    if not rows:
        raise ValueError("no per-seed rows to aggregate; run at least one seed")
    return {k: seed_stat([r.get(k) for r in rows]) for k in rows[0]}


def aggregate_json(rows: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, Any]]:
    """:func:`aggregate` as JSON: ``{key: {"mean", "std", "per_seed"}}``."""
    return {k: v.to_json() for k, v in aggregate(rows).items()}
