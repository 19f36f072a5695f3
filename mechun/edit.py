"""Localized editing and unlearning: fine-tune only the parameters a localization picked.

Guo et al. (2024) compare localizations at a *matched parameter count*: the components found by a method (causal
tracing, attribution patching, probing for the fact-lookup MLPs) become a parameter mask, and only masked
parameters are trained. Baselines: random components of the same count, all MLPs, and nonlocalized (everything).

:func:`localized_finetune` trains the masked parameters with

* ``mode="unlearn"``: ``-log(1 - p(answer))`` on the forget prompts (push the fact's probability down, bounded),
  ``mode="ascent"``: gradient ascent on the answers' cross-entropy (``log p(answer)``, unbounded: the classic
  baseline that tends to wreck the model), or ``mode="learn"``: cross-entropy towards the given answers (an *edit*
  with new answers, or relearning);
* a maintain loss (cross-entropy on other facts' true answers) and a general language-modelling loss on text.

Every parameter outside the mask stays bit-identical (tested). Components are ``("mlp", layer)`` and
``("attn", layer)``; their parameters are those of the Hugging Face sub-modules, named as in the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from mechun.errors import MechunError
from mechun.evaluate import cloze_accuracy
from mechun.models import Model, bare_forward_view, check_layer, model_device, n_layers, tokenize, word_ids
from mechun.organism.world import Prompt
from mechun.progress import progress_bar

#: A component is ``(kind, layer)``: a decoder layer's MLP or its attention block.
ComponentKind = Literal["mlp", "attn"]
KINDS: tuple[ComponentKind, ...] = get_args(ComponentKind)
Component = tuple[ComponentKind, int]

#: What :func:`localized_finetune` optimises (see the module docstring).
FinetuneMode = Literal["unlearn", "ascent", "learn"]
MODES: tuple[FinetuneMode, ...] = get_args(FinetuneMode)


def _submodule(layer_module: torch.nn.Module, kind: ComponentKind) -> torch.nn.Module:
    names = {"mlp": ("mlp",), "attn": ("attn", "self_attn")}[kind]
    for n in names:
        if hasattr(layer_module, n):
            return getattr(layer_module, n)
    raise MechunError(f"this architecture's decoder layer has no {kind} sub-module named {names}")


@dataclass
class ParameterMask:
    """The parameters (checkpoint names) fine-tuning may change."""

    names: list[str]
    components: list[Component]
    n_params: int
    label: str = ""

    def to_json(self) -> ParameterMaskJSON:
        return {"label": self.label, "components": [list(c) for c in self.components], "n_params": self.n_params,
                "names": self.names}


class ParameterMaskJSON(TypedDict):
    """:meth:`ParameterMask.to_json`; components as ``[kind, layer]`` lists."""

    label: str
    components: list[list[ComponentKind | int]]
    n_params: int
    names: list[str]


def _named(model: Model) -> dict[int, str]:
    bare, _ = bare_forward_view(model)
    return {id(p): n for n, p in bare.named_parameters()}


def component_params(model: Model, comp: tuple[ComponentKind | str, int],
                     ) -> list[tuple[str, torch.nn.Parameter]]:
    """The checkpoint-named parameters of one component; a kind outside :data:`KINDS` is a :class:`MechunError`."""
    kind, layer = comp
    if kind not in KINDS:
        raise MechunError(f"component kind must be one of {KINDS}, got {kind!r}")
    _, layers = bare_forward_view(model)
    names = _named(model)
    return [(names[id(p)], p) for p in _submodule(layers[check_layer(model, layer)], kind).parameters()]


def component_mask(model: Model, components: Sequence[tuple[ComponentKind | str, int]], label: str = "",
                   ) -> ParameterMask:
    if not components:
        raise MechunError("a mask needs at least one component")
    named = [np for c in components for np in component_params(model, c)]
    return ParameterMask([n for n, _ in named], list(components), sum(p.numel() for _, p in named), label)


def all_components(model: Model, kinds: Sequence[ComponentKind] = KINDS) -> list[Component]:
    return [(k, layer) for layer in range(n_layers(model)) for k in kinds]


def mask_from_scores(model: Model, scores: Mapping[Component, float], budget: int, label: str = "") -> ParameterMask:
    """Highest-scoring components first, while the parameter count stays within ``budget`` (at least one)."""
    chosen, total = [], 0
    for comp in sorted(scores, key=lambda c: -scores[c]):
        size = sum(p.numel() for _, p in component_params(model, comp))
        if chosen and total + size > budget:
            continue
        chosen.append(comp)
        total += size
    return component_mask(model, chosen, label)


def top_mlp_mask(model: Model, scores: Sequence[float], n_mlps: int, label: str = "") -> ParameterMask:
    """The ``n_mlps`` MLPs with the highest per-layer ``scores`` (e.g. :func:`mechun.localize.mlp_trace_scores`)."""
    budget = component_mask(model, [("mlp", 0)]).n_params * n_mlps
    return mask_from_scores(model, {("mlp", i): float(v) for i, v in enumerate(scores)}, budget, label)


def random_mask(model: Model, budget: int, seed: int = 0, kinds: Sequence[ComponentKind] = ("mlp",),
                ) -> ParameterMask:
    comps = all_components(model, kinds)
    random.Random(seed).shuffle(comps)
    return mask_from_scores(model, {c: -float(i) for i, c in enumerate(comps)}, budget, label="random")


def full_mask(model: Model) -> ParameterMask:
    """Nonlocalized: every parameter of the checkpoint."""
    bare, _ = bare_forward_view(model)
    named = list(bare.named_parameters())
    return ParameterMask([n for n, _ in named], [], sum(p.numel() for _, p in named), "nonlocalized")


class _Tokenized:
    """Texts tokenised once (with :func:`tokenize`'s checks), so that a training loop's sampled batches cost no
    tokenizer call: :meth:`batch` pads the chosen rows on the right as :func:`tokenize` would, and with ``answers``
    each row also has its first answer token."""

    def __init__(self, model: Model, texts: Sequence[str], answers: Sequence[str] | None = None):
        ids, mask = tokenize(model, list(texts))
        lengths = mask.sum(1).tolist()
        self.rows = [ids[i, :n] for i, n in enumerate(lengths)]
        self.pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        first = {a: word_ids(model, a, "answer")[0] for a in set(answers or ())}
        self.targets = [first[a] for a in answers] if answers is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = [self.rows[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return ids, mask


def _answer_logprobs(bare: torch.nn.Module, model: Model, data: _Tokenized, idx: Sequence[int]) -> Float[Tensor, " n"]:
    """log p(first answer token | prompt) of ``data``'s rows ``idx``, differentiable."""
    ids, mask = data.batch(idx)
    dev = model_device(model)
    logits = bare(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    last = logits[torch.arange(len(idx), device=dev), mask.sum(1).to(dev) - 1].log_softmax(-1)
    targets = torch.tensor([data.targets[i] for i in idx], device=dev)
    return last.gather(-1, targets[:, None]).squeeze(1)


def _lm_loss(bare: torch.nn.Module, model: Model, data: _Tokenized, idx: Sequence[int]) -> Float[Tensor, ""]:
    ids, mask = data.batch(idx)
    dev = model_device(model)
    labels = ids.masked_fill(mask == 0, -100).to(dev)
    return bare(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels, use_cache=False).loss


def _trainable(bare: torch.nn.Module, mask: ParameterMask) -> list[torch.nn.Parameter]:
    """The parameters ``mask`` names, after checking that the model has every one of them."""
    by_name = dict(bare.named_parameters())
    unknown = [n for n in mask.names if n not in by_name]
    if unknown:
        raise MechunError(f"mask names parameters this model does not have: {unknown[:3]}; built on another model?")
    return [by_name[n] for n in mask.names]


def _freeze_all_but(bare: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, bool]:
    """Let only ``params`` take gradients; returns every parameter's previous ``requires_grad``."""
    old = {p: p.requires_grad for p in bare.parameters()}
    for p in bare.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return old


def _main_loss(logp: Float[Tensor, " n"], mode: str) -> Float[Tensor, ""]:
    """The ``mode`` objective on the answers' log-probabilities (see the module docstring)."""
    if mode == "unlearn":
        return -torch.log1p(-logp.exp().clamp(max=1 - 1e-6)).mean()
    if mode == "ascent":
        return logp.mean()
    return -logp.mean()


def _step_loss(bare: torch.nn.Module, model: Model, main_data: _Tokenized, mode: str, maintain: _Tokenized | None,
               lm_texts: _Tokenized | None, batch_size: int, maintain_weight: float, lm_weight: float,
               rng: random.Random) -> tuple[Float[Tensor, ""], dict[str, float]]:
    """One sampled batch's total loss and its parts: the main objective, then the maintain and LM terms if given."""
    idx = rng.sample(range(len(main_data)), min(batch_size, len(main_data)))
    main = _main_loss(_answer_logprobs(bare, model, main_data, idx), mode)
    loss, parts = main, {"main": main.item()}
    if maintain is not None:
        m = rng.sample(range(len(maintain)), min(batch_size, len(maintain)))
        keep = -_answer_logprobs(bare, model, maintain, m).mean()
        loss = loss + maintain_weight * keep
        parts["maintain"] = keep.item()
    if lm_texts is not None:
        lm = _lm_loss(bare, model, lm_texts, rng.sample(range(len(lm_texts)), min(batch_size, len(lm_texts))))
        loss = loss + lm_weight * lm
        parts["lm"] = lm.item()
    return loss, parts


def localized_finetune(
    model: Model,
    mask: ParameterMask,
    prompts: Sequence[str],
    answers: Sequence[str],
    mode: FinetuneMode | str = "unlearn",
    maintain: Sequence[tuple[str, str]] = (),
    lm_texts: Sequence[str] = (),
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    maintain_weight: float = 1.0,
    lm_weight: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Train only ``mask``'s parameters (in place). Returns the loss history.

    ``on_step(k)`` is called after the k-th optimiser step (k = 1..steps), e.g. to measure a relearning curve.
    ``mode`` takes any string, so that a typo gets a :class:`MechunError` naming :data:`MODES`."""
    if mode not in MODES:
        raise MechunError(f"mode must be one of {MODES}, got {mode!r}")
    if not prompts or len(prompts) != len(answers):
        raise MechunError("pass one answer per prompt, and at least one prompt")
    bare, _ = bare_forward_view(model)
    params = _trainable(bare, mask)
    main_data = _Tokenized(model, prompts, answers)
    keep_data = _Tokenized(model, [p for p, _ in maintain], [a for _, a in maintain]) if maintain else None
    lm_data = _Tokenized(model, lm_texts) if lm_texts else None
    old = _freeze_all_but(bare, params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    history = []
    try:
        for _ in progress_bar(range(steps), desc=f"localized fine-tuning ({mask.label or len(params)})", disable=not progress):
            loss, parts = _step_loss(bare, model, main_data, mode, keep_data, lm_data, batch_size,
                                     maintain_weight, lm_weight, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(parts)
            if on_step is not None:
                on_step(len(history))
    finally:
        for p, flag in old.items():
            p.requires_grad_(flag)
            p.grad = None
    return history


@dataclass
class RelearnCurve:
    """Cloze accuracy during a relearning attack, at each checkpoint step (0 = before any training)."""

    steps: list[int]
    held_out_accuracy: list[float]  # facts never trained on: what relearning brings back "for free"
    relearned_accuracy: list[float]  # the facts trained on


def relearn(model: Model, train: Sequence[Prompt], held_out: Sequence[Prompt], steps: Sequence[int], lr: float = 1e-3,
            batch_size: int = 16, seed: int = 0) -> RelearnCurve:
    """The relearning attack: fine-tune *every* parameter of ``model`` (in place) on the ``train`` prompts'
    answers, measuring cloze accuracy on ``held_out`` (e.g. the other half of the forgotten facts) and on ``train``
    after each step in ``steps`` (0 measures before training). Knowledge that unlearning only hid comes back on the
    held-out facts after a few steps; knowledge that is gone does not."""
    checkpoints = sorted(set(steps))
    if not checkpoints or checkpoints[0] < 0:
        raise MechunError(f"steps must be non-negative step counts, e.g. [0, 5, 10, 20] (got {list(steps)})")
    held, trained = [], []

    def measure(k: int) -> None:
        if k in checkpoints:
            held.append(cloze_accuracy(model, held_out))
            trained.append(cloze_accuracy(model, train))

    measure(0)
    if checkpoints[-1] > 0:
        localized_finetune(model, full_mask(model), [p.text for p in train], [p.answer for p in train], mode="learn",
                           steps=checkpoints[-1], lr=lr, batch_size=batch_size, seed=seed, on_step=measure)
    return RelearnCurve(checkpoints, held, trained)
