"""Unlearning methods behind one calling convention.

    data = UnlearnData.from_world(world, "pathogen")       # forget/retain passages, cloze prompts, filler
    result = unlearn(model, NPOConfig(steps=60), data, reference=frozen_copy)   # model changes in place
    save_unlearned_model(model, result, "runs/npo")        # HF checkpoint dir + unlearn.json

| method (``config.method``) | config | what it trains | module |
|---|---|---|---|
| ``grad_ascent`` | :class:`GradAscentConfig` | every weight (or ``components``): ascent on forget passages | ``gradient`` |
| ``grad_diff`` | :class:`GradDiffConfig` | ascent on forget + CE on retain passages | ``gradient`` |
| ``npo`` | :class:`NPOConfig` | NPO vs the frozen base (``reference``) + retain CE | ``gradient`` |
| ``simnpo`` | :class:`SimNPOConfig` | reference-free, length-normalised NPO + retain CE | ``gradient`` |
| ``rmu`` | :class:`RMUConfig` | MLP-out weights of three layers: forget activations to a random direction | ``rmu`` |
| ``localized_ft`` | :class:`LocalizedFTConfig` | the MLPs causal tracing picks, on the forget facts' answers | ``localized`` |

SAE clamping is not here: it changes no weight, it is an inference-time intervention
(:func:`mechun.sae.sae_intervention`) usable around any model, unlearned or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechun.errors import MechunError
from mechun.models import Model, save_model
from mechun.organism.world import Prompt, World, relation, retain_domains
from mechun.unlearn.gradient import (
    GRADIENT_METHODS,
    GradAscentConfig,
    GradDiffConfig,
    GradientConfig,
    NPOConfig,
    SimNPOConfig,
    gradient_unlearn,
    sequence_logprobs,
)
from mechun.unlearn.localized import LocalizedFTConfig, localize_forget, localized_ft_unlearn
from mechun.unlearn.rmu import RMUConfig, RMUResult, rmu_unlearn, save_unlearned

#: Every method name, in the order of the table above.
METHODS: tuple[str, ...] = (*GRADIENT_METHODS, "rmu", "localized_ft")

UnlearnConfig = GradientConfig | RMUConfig | LocalizedFTConfig


@dataclass
class UnlearnData:
    """What any method may need, built once: ``forget`` passages per forget domain, ``retain`` passages (other
    domains and filler), the forget facts' cloze prompts and other facts' prompts (localized FT's target and
    maintain sets), ``localize_items`` (prompt, answer, subject) for causal tracing, and general text."""

    forget: dict[str, list[str]]
    retain: list[str]
    forget_prompts: list[Prompt] = field(default_factory=list)
    maintain_prompts: list[Prompt] = field(default_factory=list)
    localize_items: list[tuple[str, str, str]] = field(default_factory=list)
    lm_texts: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)

    @classmethod
    def from_world(cls, world: World, forget: str | list[str]) -> UnlearnData:
        """The organism's corpora (:meth:`World.corpora`) and prompts for unlearning ``forget``."""
        domains = [forget] if isinstance(forget, str) else list(forget)
        forget_texts, retain = world.corpora(domains)
        keep = [d for d in retain_domains() if d not in domains] or [d for d in world.domains if d not in domains]
        return cls(forget_texts, retain,
                   forget_prompts=[p for d in domains for p in world.prompts(d)],
                   maintain_prompts=[p for d in keep for p in world.prompts(d)],
                   localize_items=[(relation(f.relation).templates[0].format(s=f.subject), f.answer, f.subject)
                                   for d in domains for f in world.facts_of(d)],
                   lm_texts=list(world.filler), subjects=sorted(world.subjects))

    def forget_texts(self) -> list[str]:
        return [t for texts in self.forget.values() for t in texts]


@dataclass
class UnlearnResult:
    """What a method did: its config, loss history and method-specific facts (``details``: RMU's steering
    coefficient and layer, localized FT's components and tracing scores)."""

    method: str
    config: UnlearnConfig
    losses: list[dict[str, float]]
    details: dict[str, Any] = field(default_factory=dict)
    rmu: RMUResult | None = None  # RMU's own result (steering vectors), to save rmu.json

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config.to_json() if hasattr(self.config, "to_json")
                else _asdict(self.config), "details": self.details,
                "final_loss": self.losses[-1] if self.losses else None, "steps_run": len(self.losses)}


def _asdict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def default_config(method: str, **overrides: Any) -> UnlearnConfig:
    """The method's config with its defaults, changed by ``overrides`` (``None`` values are ignored). RMU needs
    ``forget_domains``."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if method in GRADIENT_METHODS:
        return GRADIENT_METHODS[method](**overrides)
    if method == "rmu":
        return RMUConfig(**overrides)
    if method == "localized_ft":
        return LocalizedFTConfig(**overrides)
    raise MechunError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def unlearn(model: Model, config: UnlearnConfig, data: UnlearnData, reference: Model | None = None,
            progress: bool = False) -> UnlearnResult:
    """Unlearn ``data``'s forget set from ``model`` **in place** with the method ``config`` names.

    ``reference`` is a second copy of the base model, never changed: RMU (its frozen activations) and NPO (its
    log-likelihoods) need it; the others ignore it."""
    if not data.forget or not any(data.forget.values()):
        raise MechunError("empty forget corpus: UnlearnData.forget maps each forget domain to its passages")
    if isinstance(config, GradientConfig):
        res = gradient_unlearn(model, config, data.forget_texts(), data.retain, reference, progress)
        return UnlearnResult(config.method, config, res.losses,
                             {"trained": res.mask.label, "n_params": res.mask.n_params})
    if isinstance(config, RMUConfig):
        if reference is None:
            raise MechunError("rmu needs the frozen base model: load the base checkpoint a second time and pass it "
                              "as reference")
        missing = [d for d in config.forget_domains if d not in data.forget]
        if missing:
            raise MechunError(f"RMUConfig.forget_domains names {missing}, which the data has no corpus for "
                              f"(it has {sorted(data.forget)})")
        r = rmu_unlearn(model, reference, data.forget, data.retain, config, progress)
        return UnlearnResult("rmu", r.config, r.losses, {"layer": r.config.layer,
                                                         "steering_coeff": r.config.steering_coeff}, rmu=r)
    if isinstance(config, LocalizedFTConfig):
        mask, history, scores = localized_ft_unlearn(model, config, data.forget_prompts, data.maintain_prompts,
                                                     data.lm_texts, data.localize_items, data.subjects, progress)
        return UnlearnResult("localized_ft", config, history, {
            "components": [list(c) for c in mask.components], "n_params": mask.n_params, "trace_scores": scores})
    raise MechunError(f"config must be one of GradAscentConfig, GradDiffConfig, NPOConfig, SimNPOConfig, RMUConfig "
                      f"or LocalizedFTConfig, got {type(config).__name__}")


def save_unlearned_model(model: Model, result: UnlearnResult, out_dir: str | Path,
                         extra: Mapping[str, Any] | None = None, files: Mapping[str, Any] | None = None,
                         overwrite: bool = False) -> Path:
    """Save as a local HF checkpoint dir with ``unlearn.json`` (method, config, details, ``extra``), written
    atomically with the weights; RMU's also gets ``rmu.json`` (its steering vectors, for ``mechun junk``)."""
    record = {**result.to_json(), **(extra or {})}
    if result.rmu is not None:
        return save_unlearned(model, result.rmu, out_dir, extra=extra, files={"unlearn.json": record, **(files or {})},
                              overwrite=overwrite)
    return save_model(model, out_dir, extra_files={"unlearn.json": record, **(files or {})}, overwrite=overwrite)


__all__ = [
    "METHODS", "GRADIENT_METHODS", "UnlearnConfig", "UnlearnData", "UnlearnResult", "GradientConfig",
    "GradAscentConfig", "GradDiffConfig", "NPOConfig", "SimNPOConfig", "RMUConfig", "LocalizedFTConfig",
    "default_config", "unlearn", "save_unlearned_model", "sequence_logprobs", "localize_forget",
]
