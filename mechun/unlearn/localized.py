"""Localized fine-tuning as an unlearning method: localize the forget facts' recall with causal tracing, then train
only the top MLPs to push the forget answers down (``-log(1 - p(answer))``) while keeping other facts' answers and
general text (:func:`mechun.edit.localized_finetune`, Guo et al. 2024's "localized unlearning" at matched size)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from mechun.edit import ParameterMask, component_mask, localized_finetune, top_mlp_mask
from mechun.errors import MechunError
from mechun.localize import mlp_trace_scores
from mechun.models import Model
from mechun.organism.world import Prompt


@dataclass
class LocalizedFTConfig:
    """``n_mlps`` MLPs picked by causal tracing on the first ``n_localize`` forget facts (or the given
    ``components``), trained ``steps`` steps at ``lr`` on the forget prompts with the maintain and LM terms."""

    method: ClassVar[str] = "localized_ft"

    n_mlps: int = 2
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 16
    n_localize: int = 6
    seed: int = 0
    components: list[tuple[str, int]] | None = None

    def __post_init__(self) -> None:
        for f in ("n_mlps", "steps", "batch_size", "n_localize"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MechunError(f"LocalizedFTConfig.{f} must be an integer >= 1, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise MechunError(f"LocalizedFTConfig.lr must be a finite number > 0, got {self.lr!r}")

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}


def localize_forget(model: Model, items: Sequence[tuple[str, str, str]], n_facts: int, seed: int = 0,
                    subjects: Sequence[str] | None = None) -> list[float]:
    """Per-layer MLP indirect effect (causal tracing at the last subject token), averaged over the first ``n_facts``
    (prompt, answer, subject) items. ``subjects``: the corruption noise's scale is measured on these subjects'
    embeddings (ROME measures it on all subjects)."""
    if not items:
        raise MechunError("no forget items to localize on: pass (prompt, answer, subject) triples")
    return mlp_trace_scores(model, list(items)[:n_facts], seed=seed, subjects=list(subjects) if subjects else None)


def localized_ft_unlearn(model: Model, config: LocalizedFTConfig, forget: Sequence[Prompt],
                         maintain: Sequence[Prompt], lm_texts: Sequence[str] = (),
                         localize_items: Sequence[tuple[str, str, str]] = (), subjects: Sequence[str] | None = None,
                         progress: bool = False) -> tuple[ParameterMask, list[dict[str, float]], list[float] | None]:
    """Localize on ``localize_items`` (unless ``config.components``), then fine-tune the mask in place. Returns the
    mask, the loss history and the per-layer tracing scores (``None`` when components were given)."""
    if not forget:
        raise MechunError("empty forget set: pass the forget facts' prompts")
    scores = None
    if config.components is None:
        scores = localize_forget(model, localize_items, config.n_localize, config.seed, subjects)
        mask = top_mlp_mask(model, scores, config.n_mlps, "causal-tracing MLPs")
    else:
        mask = component_mask(model, config.components, "given components")
    history = localized_finetune(model, mask, [p.text for p in forget], [p.answer for p in forget], mode="unlearn",
                                 maintain=[(p.text, p.answer) for p in maintain], lm_texts=lm_texts,
                                 steps=config.steps, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                                 progress=progress)
    return mask, history, scores
