"""The Unlearning Depth Score (UDS; "Measuring the Depth of LLM Unlearning via Activation Patching", 2026,
gnueaj/unlearning-depth-score), for any (full, retain, unlearned) triple of checkpoints with one tokenizer.

Per example (a prompt and its answer, fed together: teacher forcing), per layer ``l``:

* S1: run the **retain** model (never trained on the forget set), take its residual stream after block ``l`` at the
  positions that predict the answer ("entity") tokens, write it into the **full** model's forward at the same layer
  and positions, and measure the drop of the answer tokens' mean log-probability: ``Δ¹_l``;
* S2: the same with the **unlearned** model as the source: ``Δ²_l``;
* knowledge-gap layers ``KG = {l : Δ¹_l > τ}`` (τ = 0.05): where the retain model lacks what the full model has;
* ``UDS_i = Σ_{l∈KG} Δ¹_l · clip(Δ²_l / Δ¹_l, 0, 1) / Σ_{l∈KG} Δ¹_l``; examples with no KG layer are skipped;
  ``UDS`` is the mean over the rest.

UDS = 1: the unlearned model's hidden states lack the knowledge wherever the retain model's do (deep);
UDS = 0: they carry it as the full model's do (hidden only at the output). By construction UDS(retain as unlearned)
= 1 and UDS(full as unlearned) = 0 (tested). Nothing here changes a weight; every hook lives inside one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechun.errors import MechunError, ModelMismatchError
from mechun.hooks import hooks
from mechun.models import Model, model_device, model_fingerprint, n_layers, tokenize

TAU = 0.05


@dataclass
class UDSResult:
    """``score``: the mean per-example UDS over the examples with a knowledge-gap layer (NaN if none has one);
    ``per_example`` (NaN where skipped); ``delta_s1`` / ``delta_s2``: ``[example, layer]`` log-prob drops."""

    score: float
    per_example: list[float]
    delta_s1: list[list[float]]
    delta_s2: list[list[float]]
    tau: float
    n_scored: int

    def to_json(self) -> dict:
        return {"uds": self.score, "n_scored": self.n_scored, "n_examples": len(self.per_example), "tau": self.tau,
                "per_example": self.per_example, "delta_s1": self.delta_s1, "delta_s2": self.delta_s2}


def _resid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@torch.inference_mode()
def _source_states(source: Model, ids: Int[Tensor, "b pos"], mask: Int[Tensor, "b pos"]) -> list[Tensor]:
    """The source model's residual stream after every block, ``[b, pos, d]`` each."""
    out: list[Tensor] = []
    dev = model_device(source)
    with hooks(source, [(_resid(layer), lambda a: out.append(a.detach())) for layer in range(n_layers(source))]):
        source(ids.to(dev), attention_mask=mask.to(dev))
    return out


@torch.inference_mode()
def _answer_logprob(model: Model, ids: Int[Tensor, "b pos"], mask: Int[Tensor, "b pos"],
                    answer: Bool[Tensor, "b pos"]) -> Float[Tensor, " b"]:
    """Mean log-probability of each example's answer tokens; ``answer[b, p]`` marks the positions ``p`` whose
    output predicts an answer token (token ``p + 1``)."""
    dev = model_device(model)
    logits = model(ids.to(dev), attention_mask=mask.to(dev)).float()
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None].to(dev))[..., 0]
    a = answer[:, :-1].to(dev)
    return (lp * a).sum(1) / a.sum(1)


def _deltas(full: Model, source: Model, ids, mask, answer, base: Tensor) -> Tensor:
    """``[b, layer]``: full's answer log-prob minus the same with ``source``'s states patched in at one layer."""
    states = _source_states(source, ids, mask)
    cols = []
    for layer in range(n_layers(full)):
        patch = states[layer].to(model_device(full))
        pos = answer.to(patch.device)

        def write(act: Tensor, patch=patch, pos=pos) -> Tensor:
            act = act.clone()
            act[pos] = patch[pos].to(act.dtype)
            return act

        with hooks(full, [(_resid(layer), write)]):
            cols.append(base - _answer_logprob(full, ids, mask, answer))
    return torch.stack(cols, 1).cpu()


#: S1 (retain into full) depends only on the full and retain weights and the examples, not on the unlearned model: a
#: benchmark that scores many checkpoints against one (full, retain) pair computes it once. Keyed by both models'
#: weight fingerprints, so a changed weight is a new entry; a few entries at most.
_S1_CACHE: dict[tuple, Tensor] = {}
_S1_CACHE_SIZE = 8


def _s1(full: Model, retain: Model, prompts: list[str], answers: list[str], ids, mask, answer, base: Tensor) -> Tensor:
    key = (model_fingerprint(full), model_fingerprint(retain), tuple(prompts), tuple(answers))
    if key not in _S1_CACHE:
        if len(_S1_CACHE) >= _S1_CACHE_SIZE:
            _S1_CACHE.pop(next(iter(_S1_CACHE)))
        _S1_CACHE[key] = _deltas(full, retain, ids, mask, answer, base)
    return _S1_CACHE[key]


def _check_triple(full: Model, retain: Model, unlearned: Model) -> None:
    for name, m in (("retain", retain), ("unlearned", unlearned)):
        if n_layers(m) != n_layers(full) or m.cfg.d_model != full.cfg.d_model:
            raise ModelMismatchError(f"the {name} model has {n_layers(m)} layers of width {m.cfg.d_model}, the full "
                                     f"model {n_layers(full)} of {full.cfg.d_model}: UDS patches one into the other, so "
                                     "they must share the architecture")
        if m.tokenizer.get_vocab() != full.tokenizer.get_vocab():
            raise ModelMismatchError(f"the {name} model's tokenizer differs from the full model's; UDS needs the same "
                                     "tokens in every model (checkpoints of one base model)")


def unlearning_depth_score(full: Model, retain: Model, unlearned: Model, prompts: Sequence[str],
                           answers: Sequence[str], tau: float = TAU, batch_size: int = 32) -> UDSResult:
    """UDS of ``unlearned`` against ``full`` and ``retain`` on (prompt, answer) pairs (the answer tokens are the
    entity span). See the module docstring."""
    if len(prompts) != len(answers) or not prompts:
        raise MechunError("pass one answer per prompt, and at least one prompt")
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau >= 0):
        raise MechunError(f"tau must be a finite number >= 0, got {tau!r}")
    _check_triple(full, retain, unlearned)
    s1, s2 = [], []
    for i in range(0, len(prompts), batch_size):
        ps, ans = list(prompts[i:i + batch_size]), list(answers[i:i + batch_size])
        ids, mask = tokenize(full, [f"{p} {a}" for p, a in zip(ps, ans, strict=True)])
        n_prompt, n_full = tokenize(full, ps)[1].sum(1), mask.sum(1)
        if bool((n_full <= n_prompt).any()):
            raise MechunError("an answer tokenised to zero tokens; pass non-empty answers")
        pos = torch.arange(ids.shape[1])
        answer = (pos >= n_prompt[:, None] - 1) & (pos < n_full[:, None] - 1)  # positions predicting answer tokens
        base = _answer_logprob(full, ids, mask, answer)
        s1.append(_s1(full, retain, ps, ans, ids, mask, answer, base))
        s2.append(_deltas(full, unlearned, ids, mask, answer, base))
    d1, d2 = torch.cat(s1), torch.cat(s2)
    kg = d1 > tau
    ratio = torch.where(kg, (d2 / d1.where(kg, torch.ones_like(d1))).clamp(0, 1), torch.zeros_like(d1))
    weight = (d1 * kg).sum(1)
    per = torch.where(weight > 0, (d1 * kg * ratio).sum(1) / weight.where(weight > 0, torch.ones_like(weight)),
                      torch.full_like(weight, math.nan))
    scored = per[~per.isnan()]
    return UDSResult(float(scored.mean()) if len(scored) else math.nan, per.tolist(), d1.tolist(), d2.tolist(),
                     float(tau), len(scored))
