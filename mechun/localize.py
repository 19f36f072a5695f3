"""Localizing fact recall: activation patching (batched), attribution patching, causal tracing.

**Activation patching** runs the model on a *corrupt* prompt and replaces one activation -- a layer's residual
stream, MLP or attention output at one position -- with its value from the *clean* run; the change in a metric
(e.g. logit(answer) - logit(wrong) at the last position) says how much that activation carries the difference.
TransformerLens' ``patching`` module runs one forward pass per patched index; :func:`activation_patching` puts many
patched copies of the corrupt prompt in one batch (each copy patched at its own layer and position), so a whole
layer x position sweep costs a handful of forwards. The numbers are the same (tested against
``patching.get_act_patch_resid_pre``).

**Attribution patching** (Nanda 2023) approximates every patch at once to first order: the metric's gradient on the
corrupt run, dotted with (clean - corrupt) activations. One forward on each input and one backward. It can mislead
where the metric is far from linear in the activation (saturated softmax, attention patterns).

**Causal tracing** (ROME, Meng et al. 2022) corrupts the *subject* tokens' embeddings with Gaussian noise, then
restores the clean hidden state at one (layer, token): the indirect effect is p(answer | restored) - p(answer |
corrupted), averaged over noise samples. Restoring MLP or attention outputs uses a window of k layers around the
layer, as in ROME. The noise scale follows ROME's rule by default: sigma = 3 x the standard deviation of the
embeddings of subject tokens, pooled over a *set* of subjects (ROME pooled the subjects of its known-facts dataset;
:func:`subject_embedding_std`). The scale matters: too little noise leaves the fact recallable, too much pushes
activations off-distribution. ``noise_rule="embedding"`` (3 x the std of the whole embedding matrix) is the older,
cruder choice, kept for comparison. Like every patching method it measures where information *can be
moved*, which is not always where it is stored -- the fact-lookup vs output-tracing distinction of Guo et al.
(2024).

Nothing here changes weights; every hook is removed on exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechun.cache import cache_residuals
from mechun.errors import MechunError
from mechun.hooks import hooks
from mechun.models import (
    HOOK_KINDS,
    HookKind,
    Model,
    bare_module,
    check_layer,
    check_token_ids,
    hook_name,
    model_device,
    n_layers,
    tokenize,
    word_ids,
)
from mechun.partial import (
    LAST_POSITION_ATTR,
    Patch,
    check_last_position,
    metric_values,
    partial_forward,
    tapped_metric,
)

#: A metric maps logits to one number per batch row (e.g. a logit difference at the last position).
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]
#: A prompt as text, or its token ids (``pos`` or ``1 pos``, with the tokenizer's special tokens).
PromptLike = str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"]
#: The hooks activation and attribution patching can patch: every short hook kind of :mod:`mechun.models`.
PATCH_HOOKS: tuple[HookKind, ...] = HOOK_KINDS

#: What causal tracing restores: the block output ("resid"), or the MLP or attention output over a window of layers.
TraceKind = Literal["resid", "mlp", "attn"]
TRACE_KINDS: tuple[TraceKind, ...] = get_args(TraceKind)
_TRACE_HOOKS: dict[TraceKind, HookKind] = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
#: How causal tracing scales its noise: by the subject tokens' embedding std (ROME) or the whole matrix's.
NoiseRule = Literal["subjects", "embedding"]
NOISE_RULES: tuple[NoiseRule, ...] = get_args(NoiseRule)


@dataclass
class PatchingResult:
    """``scores[layer, position]``: the metric with that activation patched in (or the effect, for tracing).

    ``sigma`` is the standard deviation of the noise causal tracing added to the subject embeddings (``None`` for
    the other methods), so a saved result says which noise it was measured under."""

    scores: Float[Tensor, "layer pos"]
    hook: str
    tokens: list[str]
    clean_metric: float
    corrupt_metric: float
    layers: list[int]
    sigma: float | None = None

    def normalized(self) -> Float[Tensor, "layer pos"]:
        """0 = as corrupt, 1 = as clean."""
        return (self.scores - self.corrupt_metric) / (self.clean_metric - self.corrupt_metric)

    def peak(self) -> tuple[int, int, float]:
        flat = int(self.scores.argmax())
        layer, pos = divmod(flat, self.scores.shape[1])
        return self.layers[layer], pos, float(self.scores.flatten()[flat])

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("PatchingResult", hook=self.hook, layers=len(self.layers), positions=len(self.tokens),
                          clean_metric=self.clean_metric, corrupt_metric=self.corrupt_metric, peak=self.peak())

    def _repr_html_(self) -> str:
        from mechun.display import frame, svg_heatmap, table

        layer, pos, value = self.peak()
        normalized = self.clean_metric != self.corrupt_metric
        shown = self.normalized() if normalized else self.scores
        row = {"hook": self.hook, "clean metric": self.clean_metric, "corrupt metric": self.corrupt_metric,
               "peak layer": layer, "peak token": f"{pos}: {self.tokens[pos]!r}", "metric at peak": value}
        if self.sigma is not None:
            row["noise sigma"] = self.sigma
        heat = svg_heatmap(shown.tolist(), [str(x) for x in self.layers],
                           [f"{i} {t}" for i, t in enumerate(self.tokens)])
        what = "normalized (0 = corrupt, 1 = clean)" if normalized else "scores"
        return frame(f"PatchingResult: {what}, layer x token", heat, table([row]),
                     hint="mechun.plots.patching_heatmap(result, title) for the interactive figure")

    def to_json(self) -> dict:
        out = {"hook": self.hook, "tokens": self.tokens, "layers": self.layers, "scores": self.scores.tolist(),
               "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric}
        return out if self.sigma is None else {**out, "sigma": self.sigma}


def last_position(metric: Metric) -> Metric:
    """Mark ``metric`` as reading the logits at the last position only (``logits[:, -1]``), so activation patching
    may compute the unembedding there alone and pass ``batch 1 vocab`` logits. Returns the same function."""
    setattr(metric, LAST_POSITION_ATTR, True)
    return metric


def logit_diff_metric(model: Model, answer: str, wrong: str) -> Metric:
    """logit(answer) - logit(wrong) at the last position, for single-token words (after a space)."""
    ids = []
    for word, what in ((answer, "answer"), (wrong, "wrong answer")):
        toks = word_ids(model, word, what)
        if len(toks) != 1:
            raise MechunError(f"{word!r} is {len(toks)} tokens; the logit-difference metric needs one-token words")
        ids.append(toks[0])
    a, w = ids

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        return logits[:, -1, a].float() - logits[:, -1, w].float()

    return last_position(metric)


def answer_prob_metric(model: Model, answer: str) -> Metric:
    """p(answer) at the last position, for a one-token answer (after a space), like :func:`logit_diff_metric`."""
    toks = word_ids(model, answer, "answer")
    if len(toks) != 1:
        raise MechunError(f"answer {answer!r} is {len(toks)} tokens; the probability metric scores one token: pass "
                          "the answer's first token")
    tok = toks[0]

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        return logits[:, -1].float().softmax(-1)[:, tok]

    return last_position(metric)


def _tokens(model: Model, text_or_ids: PromptLike) -> Int[Tensor, "1 pos"]:
    if isinstance(text_or_ids, Tensor):
        ids = text_or_ids if text_or_ids.ndim == 2 else text_or_ids[None]
        if ids.shape[0] != 1:
            raise MechunError("pass one prompt (a 1 x pos tensor) at a time")
        check_token_ids(model, ids)
        return ids
    return tokenize(model, [text_or_ids])[0]


def _layers(model: Model, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(n_layers(model)))
    out = [check_layer(model, x) for x in layers]
    if not out:
        raise MechunError("layers is empty; pass the layers to patch, or None for every layer")
    twice = sorted({x for x in out if out.count(x) > 1})
    if twice:
        raise MechunError(f"layers names layer(s) {twice} more than once (negative indices count from the end); "
                          "list each layer once")
    return out


def _check_hook(hook: str) -> None:
    """The check users outside pytest get (under pytest the runtime type checker rejects a bad kind first)."""
    if hook not in PATCH_HOOKS:
        raise MechunError(f"hook must be one of {PATCH_HOOKS}, got {hook!r}")


def _write_hook(hook: str) -> str:
    """Where a patch of ``hook`` is written. resid_mid is written through the attention output (attn_out := clean
    resid_mid - corrupt resid_pre): the bridge's ``hook_resid_mid`` sits at the MLP norm's *input*, and the decoder
    layer keeps its own reference to the residual, so a value written there reaches the MLP but not the stream."""
    return "attn_out" if hook == "resid_mid" else hook


def _site_name(model: Model, kind: str, layer: int) -> str:
    """The hook point of a patch kind: a :data:`HookKind`, or ``"z"`` for a head's output (``attn.hook_z``)."""
    return f"blocks.{layer}.attn.hook_z" if kind == "z" else hook_name(model, kind, layer)


def _partial_sweep(model: Model, ids_c: Int[Tensor, "1 pos"], ids_x: Int[Tensor, "1 pos"], metric: Metric,
                   hook: str, layers: list[int], n_heads: int | None, batch_size: int
                   ) -> tuple[Float[Tensor, "layer pos *head"], float, float] | None:
    """Every (layer, position[, head]) patch of ``hook`` (a :data:`HookKind`, or ``"z"`` for per-head patching) by
    partial forwards (:mod:`mechun.partial`): scores ``layer pos`` (``layer pos head`` with ``n_heads``), clean and
    corrupt metric. ``None`` where the partial path does not apply."""
    engine = partial_forward(model, ids_x)
    if engine is None:
        return None
    check_last_position(metric, engine.logits)
    corrupt_metric = float(metric_values(metric, engine.logits)[0])

    sites = {layer: bare_module(model, _site_name(model, _write_hook(hook), layer)) for layer in layers}
    clean: dict[int, Tensor] = {}

    def keep(layer: int):
        return lambda act: clean.__setitem__(layer, act[0].clone())

    clean_metric = float(tapped_metric(model, ids_c, {_site_name(model, hook, layer): keep(layer) for layer in layers},
                                       metric).float()[0])
    if hook == "resid_mid":  # written through attn_out: the value that makes the stream clean_mid at (layer, pos)
        clean = {layer: clean[layer] - engine.inputs[layer][0] for layer in layers}
    n_pos = ids_x.shape[1]
    heads = range(n_heads) if n_heads is not None else [None]
    rows = [(li, pos, h) for li in range(len(layers)) for pos in range(n_pos) for h in heads]
    scores = torch.empty(len(layers), n_pos, len(heads))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        patches = [Patch(layers[li], pos, clean[layers[li]][pos] if h is None else
                         clean[layers[li]][pos].view(n_heads, -1)[h], h) for li, pos, h in chunk]
        values = engine.run(lambda layer: sites[layer], patches, metric, n_heads)
        for (li, pos, h), v in zip(chunk, values, strict=True):
            scores[li, pos, 0 if h is None else h] = v
    return scores if n_heads is not None else scores[..., 0], clean_metric, corrupt_metric


def _bridge_sweep(model: Model, ids_c: Int[Tensor, "1 pos"], ids_x: Int[Tensor, "1 pos"], metric: Metric,
                  hook: str, layers: list[int], n_heads: int | None, batch_size: int
                  ) -> tuple[Float[Tensor, "layer pos *head"], float, float]:
    """What :func:`_partial_sweep` returns, by whole forwards through the bridge, under whatever hooks are active:
    one clean forward keeps the activations to patch in (and gives the clean metric), one corrupt forward the
    corrupt metric (and, for ``resid_mid``, the corrupt residual the patch is written against), then patched copies
    of the corrupt prompt, ``batch_size`` rows per forward."""
    dev, n_pos = model_device(model), ids_x.shape[1]
    per_head = n_heads is not None

    def shaped(act: Tensor) -> Tensor:  # the bridge passes z flattened (batch pos heads*d_head)
        return act.reshape(*act.shape[:2], n_heads, -1) if per_head and act.ndim == 3 else act

    def keep(store: dict[int, Tensor], layer: int):
        return lambda act: store.__setitem__(layer, shaped(act)[0].clone())

    clean: dict[int, Tensor] = {}
    with hooks(model, [(_site_name(model, hook, layer), keep(clean, layer)) for layer in layers]):
        clean_metric = float(metric_values(metric, model(ids_c.to(dev)))[0])
    corrupt_pre: dict[int, Tensor] = {}
    with hooks(model, [(_site_name(model, "resid_pre", layer), keep(corrupt_pre, layer))
                       for layer in (layers if hook == "resid_mid" else [])]):
        corrupt_logits = model(ids_x.to(dev))
    check_last_position(metric, corrupt_logits)
    if hook == "resid_mid":  # written through attn_out: the value that makes the stream clean_mid there
        clean = {layer: clean[layer] - corrupt_pre[layer] for layer in layers}
    write = "z" if per_head else _write_hook(hook)
    heads = range(n_heads) if per_head else [0]
    rows = [(li, pos, h) for li in range(len(layers)) for pos in range(n_pos) for h in heads]
    scores = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        by_layer: dict[int, list[tuple[int, int, int]]] = {}
        for r, (li, pos, h) in enumerate(chunk):
            by_layer.setdefault(li, []).append((r, pos, h))

        def patch(li: int, entries: list[tuple[int, int, int]]):
            r, pos, h = (torch.tensor(x, device=dev) for x in zip(*entries, strict=True))
            value = clean[layers[li]][pos, h] if per_head else clean[layers[li]][pos]

            def fn(act: Tensor) -> Tensor:
                out = shaped(act).clone()
                out[(r, pos, h) if per_head else (r, pos)] = value.to(act.dtype)
                return out.reshape(act.shape)
            return fn

        with hooks(model, [(_site_name(model, write, layers[li]), patch(li, e)) for li, e in by_layer.items()]):
            scores[start:start + len(chunk)] = metric_values(
                metric, model(ids_x.expand(len(chunk), -1).to(dev))).cpu()
    shape = (len(layers), n_pos, n_heads) if per_head else (len(layers), n_pos)
    return scores.reshape(shape), clean_metric, float(metric_values(metric, corrupt_logits)[0])


def _prompt_pair(model: Model, clean: PromptLike, corrupt: PromptLike) -> tuple[Tensor, Tensor]:
    """The clean and corrupt prompts' token ids, refused unless they have equal lengths (aligned positions)."""
    ids_c, ids_x = _tokens(model, clean), _tokens(model, corrupt)
    if ids_c.shape != ids_x.shape:
        raise MechunError(f"clean and corrupt prompts are {ids_c.shape[1]} and {ids_x.shape[1]} tokens; patching "
                          "needs prompts of equal length (aligned positions)")
    return ids_c, ids_x


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MechunError(f"batch_size must be an integer >= 1 (rows of one forward), got {batch_size!r}")


@torch.inference_mode()
def activation_patching(
    model: Model,
    clean: PromptLike,
    corrupt: PromptLike,
    metric: Metric,
    hook: HookKind = "resid_pre",
    layers: Sequence[int] | None = None,
    batch_size: int = 256,
) -> PatchingResult:
    """Patch each (layer, position) activation of ``hook`` from the clean into the corrupt run.

    On the architectures of :data:`mechun.partial.PARTIAL_ARCHITECTURES`, with no hook on any of the bridge's modules,
    each patch recomputes only the layers from its own on and the positions from its own on, reusing the corrupt
    run's earlier keys and values (:mod:`mechun.partial`); a metric marked by :func:`last_position` (those of this
    module are) gets ``batch 1 vocab`` logits. Otherwise many patched copies of the corrupt prompt share one whole
    forward through the bridge, under whatever hooks are active. Both give TransformerLens' numbers (tested).
    ``batch_size`` bounds the rows of one forward.

    ``resid_mid`` is patched *as the residual stream*: the stream between attention and MLP is set to its clean value
    by writing ``clean resid_mid - corrupt resid_pre`` as the attention output. (TransformerLens' bridge hook
    ``hook_resid_mid`` is the MLP norm's input; a value written there reaches the MLP but not the stream, which the
    decoder layer holds on its own, so ``patching.get_act_patch_resid_mid`` on a bridge patches the MLP's input only.)"""
    _check_hook(hook)
    _check_batch_size(batch_size)
    ids_c, ids_x = _prompt_pair(model, clean, corrupt)
    layers = _layers(model, layers)
    tokens = model.tokenizer.convert_ids_to_tokens(ids_c[0])
    scores, clean_metric, corrupt_metric = (
        _partial_sweep(model, ids_c, ids_x, metric, hook, layers, None, batch_size)
        or _bridge_sweep(model, ids_c, ids_x, metric, hook, layers, None, batch_size))
    return PatchingResult(scores, hook, tokens, clean_metric, corrupt_metric, layers)


def attribution_patching(
    model: Model,
    clean: PromptLike,
    corrupt: PromptLike,
    metric: Metric,
    hooks_: Sequence[HookKind] = ("resid_pre", "attn_out", "mlp_out"),
) -> dict[HookKind, PatchingResult]:
    """First-order estimate of every patch at once: grad(metric on corrupt) . (clean - corrupt), per layer x pos.

    ``scores`` hold the *estimated change* of the metric (not the patched metric itself). The cost is one clean
    forward (every hook kind's activations and the clean metric), one corrupt forward with gradients and one
    backward to the activations only; where no hook point has a hook they run through the bare HF modules
    (:func:`mechun.partial.tapped_metric`), with the LM head at the last position alone for a metric marked by
    :func:`last_position`."""
    ids_c, ids_x = _prompt_pair(model, clean, corrupt)
    for h in hooks_:
        _check_hook(h)
    L, dev = n_layers(model), model_device(model)
    clean: dict[tuple[str, int], Tensor] = {}

    def keep_clean(h: str, layer: int):
        def fn(act: Tensor) -> None:
            clean[(h, layer)] = act.detach()[0]
        return fn

    # one clean forward gives every hook kind's activations and the clean metric
    with torch.inference_mode():
        clean_value = float(tapped_metric(model, ids_c.to(dev), {hook_name(model, h, layer): keep_clean(h, layer)
                                                               for h in hooks_ for layer in range(L)}, metric,
                                          check=True)[0])
    saved: dict[tuple[str, int], Tensor] = {}

    def keep(h: str, layer: int):
        def fn(act: Tensor) -> None:
            saved[(h, layer)] = act
        return fn

    with torch.enable_grad():
        out = tapped_metric(model, ids_x.to(dev), {hook_name(model, h, layer): keep(h, layer)
                                                   for h in hooks_ for layer in range(L)}, metric).sum()
        keys = list(saved)
        grads = torch.autograd.grad(out, [saved[k] for k in keys])  # activation gradients only, no weight grads
    corrupt_value = float(out.detach())
    result = {}
    for h in hooks_:
        scores = torch.stack([
            ((clean[(h, layer)] - saved[(h, layer)][0].detach()) * grads[keys.index((h, layer))][0]).sum(-1)
            for layer in range(L)]).float().cpu()
        result[h] = PatchingResult(scores, h, model.tokenizer.convert_ids_to_tokens(ids_c[0]),
                                   clean_value, corrupt_value, list(range(L)))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Causal tracing
# ---------------------------------------------------------------------------------------------------------------
def _subject_ids(model: Model, subject: str, at_start: bool) -> list[int]:
    """The token ids of ``subject`` as it appears inside a prompt: after a space, unless the prompt starts with it
    (matters for GPT-2-style BPE). No special tokens (BOS)."""
    return word_ids(model, subject, "subject", at_start=at_start)


def subject_positions(model: Model, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` inside ``prompt`` (its last occurrence)."""
    ids = tokenize(model, [prompt])[0][0].tolist()
    sub = _subject_ids(model, subject, at_start=prompt.startswith(subject))
    for start in range(len(ids) - len(sub), -1, -1):
        if ids[start:start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise MechunError(f"subject {subject!r} not found in the tokens of {prompt!r}")


def _embedding_weight(model: Model) -> Float[Tensor, "vocab d_model"]:
    """The input embedding matrix, whose rows are what ``embed.hook_out`` emits (where tracing adds its noise)."""
    embed = model.embed
    return embed._original_component.weight if hasattr(embed, "_original_component") else model.W_E


def subject_embedding_std(model: Model, subjects: Sequence[str]) -> float:
    """ROME's noise unit: the standard deviation of all elements of the input embeddings of the subjects' tokens,
    pooled over every distinct subject (``n_tokens x d_model`` values).

    Each subject is tokenized as it usually appears inside a prompt, after a space (the BPE tokens GPT-2 sees
    mid-sentence; ROME tokenized the bare subject), without special tokens, so BOS never counts. ROME pooled the
    subjects of its whole known-facts dataset; pass the subjects of your dataset (for the organism,
    ``list(world.subjects)``)."""
    if isinstance(subjects, str):
        raise MechunError(f"pass a list of subjects, not one string ({subjects!r} would be read letter by letter)")
    distinct = list(dict.fromkeys(subjects))
    if not distinct:
        raise MechunError("pass at least one subject to compute the subject-token embedding std")
    ids = [i for s in distinct for i in _subject_ids(model, s, at_start=False)]
    if not ids:
        raise MechunError(f"the subjects {distinct[:3]} tokenize to no tokens; pass subject names")
    weight = _embedding_weight(model)
    return float(weight[torch.tensor(ids, device=weight.device)].detach().float().std())


def trace_noise_sigma(model: Model, noise: float = 3.0, rule: NoiseRule = "subjects",
                      subjects: Sequence[str] | None = None) -> float:
    """The standard deviation of the noise causal tracing adds to each subject-token embedding element.

    ``rule="subjects"`` (ROME): ``noise x subject_embedding_std(model, subjects)``; ``rule="embedding"``:
    ``noise x`` the std of the whole embedding matrix (special and unused tokens included). Compute it once and pass
    it to :func:`causal_trace` as ``sigma=`` when tracing many prompts."""
    if rule not in NOISE_RULES:
        raise MechunError(f"noise_rule must be one of {NOISE_RULES}, got {rule!r}")
    if not math.isfinite(noise) or noise < 0:
        raise MechunError(f"noise must be a finite number >= 0 (ROME uses 3.0), got {noise}")
    if rule == "embedding":
        if subjects is not None:
            raise MechunError("subjects set the noise only under noise_rule='subjects'; drop them or switch rule")
        return noise * float(_embedding_weight(model).detach().float().std())
    if subjects is None:
        raise MechunError("noise_rule='subjects' needs the subjects to pool (ROME: all subjects of the dataset)")
    return noise * subject_embedding_std(model, subjects)


def _noise_hook(eps: Float[Tensor, "samples subj d_model"], subj: list[int], n_copies: int
                ) -> Callable[[Tensor], Tensor]:
    """Add ``eps`` to the subject positions of the embeddings of ``n_copies`` x samples rows."""
    def fn(act: Tensor) -> Tensor:
        act = act.clone()
        act[:, subj] += eps.to(act.device, act.dtype).repeat(n_copies, 1, 1)
        return act
    return fn


def _restore_hook(clean_layer: Float[Tensor, "pos d_model"], rows: Int[Tensor, " n"], pos: Int[Tensor, " n"]
                  ) -> Callable[[Tensor], Tensor]:
    """Write the clean activation back at (row, position) pairs."""
    def fn(act: Tensor) -> Tensor:
        act = act.clone()
        act[rows, pos] = clean_layer[pos].to(act.dtype)
        return act
    return fn


def _restored_probs(model: Model, ids: Int[Tensor, "1 pos"], prob: Metric, kind: TraceKind,
                    clean: Float[Tensor, "layer pos d_model"], eps: Float[Tensor, "samples subj d_model"],
                    subj: list[int], window: int, batch_size: int) -> Float[Tensor, "layer pos"]:
    """p(answer) under noise with each (layer, position) restored, averaged over the noise samples."""
    L, P, dev, samples = n_layers(model), ids.shape[1], model_device(model), eps.shape[0]
    configs = [(layer, pos) for layer in range(L) for pos in range(P)]
    per_fwd = max(1, batch_size // samples)
    out = torch.empty(len(configs))
    for start in range(0, len(configs), per_fwd):
        chunk = configs[start:start + per_fwd]
        restore: dict[int, list[tuple[int, int]]] = {}  # layer -> [(copy, pos)]
        for c, (layer, pos) in enumerate(chunk):
            lo = layer - window // 2
            for lay in [layer] if kind == "resid" else range(max(0, lo), min(L, lo + window)):
                restore.setdefault(lay, []).append((c, pos))
        fwd = [("embed.hook_out", _noise_hook(eps, subj, len(chunk)))]
        for lay, pairs in restore.items():
            copies = torch.tensor([c for c, _ in pairs], device=dev)
            pos = torch.tensor([p for _, p in pairs], device=dev)
            rows = (copies[:, None] * samples + torch.arange(samples, device=dev)[None]).reshape(-1)
            pos_rows = pos[:, None].expand(-1, samples).reshape(-1)
            fwd.append((hook_name(model, _TRACE_HOOKS[kind], lay), _restore_hook(clean[lay], rows, pos_rows)))
        with hooks(model, fwd):
            p = prob(model(ids.expand(len(chunk) * samples, -1).to(dev))).float().cpu()
        out[start:start + len(chunk)] = p.reshape(len(chunk), samples).mean(1)
    return out.reshape(L, P)


@torch.inference_mode()
def causal_trace(
    model: Model,
    prompt: str,
    answer: str,
    subject: str,
    kind: TraceKind = "resid",
    noise: float = 3.0,
    samples: int = 10,
    window: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    *,
    noise_rule: NoiseRule = "subjects",
    subjects: Sequence[str] | None = None,
    sigma: float | None = None,
) -> PatchingResult:
    """ROME causal tracing. ``kind``: "resid" (restore the block output), "mlp" or "attn" (restore that sublayer's
    output at ``window`` layers centred on each layer). ``scores`` are indirect effects; ``clean_metric`` and
    ``corrupt_metric`` are p(answer) clean and with the subject corrupted.

    The noise has std ``sigma`` (recorded on the result); by default :func:`trace_noise_sigma` with ``noise`` and
    ``noise_rule``, pooling ``subjects``. Without ``subjects`` the rule pools only this prompt's subject, a noisy
    estimate: pass your dataset's subjects (ROME pooled all of its known facts'), or a precomputed ``sigma``."""
    if kind not in TRACE_KINDS:
        raise MechunError(f"kind must be one of {TRACE_KINDS}, got {kind!r}")
    if samples < 1 or window < 1:
        raise MechunError("samples and window must be >= 1")
    if sigma is None:
        pool = subjects if subjects is not None or noise_rule == "embedding" else [subject]
        sigma = trace_noise_sigma(model, noise, noise_rule, pool)
    elif subjects is not None:
        raise MechunError("pass either sigma (precomputed) or subjects (to compute it from), not both")
    elif not math.isfinite(sigma) or sigma < 0:
        raise MechunError(f"sigma must be a finite number >= 0, got {sigma}")
    ids = _tokens(model, prompt)
    subj = subject_positions(model, prompt, subject)
    dev = model_device(model)
    prob = answer_prob_metric(model, answer)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(samples, len(subj), int(model.cfg.d_model), generator=gen) * sigma
    clean = cache_residuals(model, ids, positions="all", hook=_TRACE_HOOKS[kind], progress=False,
                            store_device=dev).acts[:, 0]
    with hooks(model, [("embed.hook_out", _noise_hook(eps, subj, 1))]):
        p_corrupt = float(prob(model(ids.expand(samples, -1).to(dev))).mean())
    p_clean = float(prob(model(ids.to(dev)))[0])
    effects = _restored_probs(model, ids, prob, kind, clean, eps, subj, window, batch_size) - p_corrupt
    return PatchingResult(effects, f"causal_trace/{kind}", model.tokenizer.convert_ids_to_tokens(ids[0]),
                          p_clean, p_corrupt, list(range(n_layers(model))), sigma)


def mlp_trace_scores(model: Model, items: Sequence[tuple[str, str, str]], samples: int = 5, seed: int = 0, *,
                     subjects: Sequence[str] | None = None, noise: float = 3.0,
                     noise_rule: NoiseRule = "subjects") -> list[float]:
    """Per-layer MLP indirect effect at the subject's last token (:func:`causal_trace` with ``kind="mlp"``),
    averaged over ``(prompt, answer, subject)`` items: the ROME-style score for choosing which MLPs to edit.

    The noise is computed once (:func:`trace_noise_sigma`), pooling ``subjects`` -- by default the items' own
    subjects; pass the whole dataset's (for the organism, ``list(world.subjects)``) to follow ROME."""
    if not items:
        raise MechunError("pass at least one (prompt, answer, subject) item")
    if subjects is None and noise_rule == "subjects":
        subjects = [s for _, _, s in items]
    sigma = trace_noise_sigma(model, noise, noise_rule, subjects)
    scores = [0.0] * n_layers(model)
    for prompt, answer, subject in items:
        res = causal_trace(model, prompt, answer, subject, kind="mlp", samples=samples, seed=seed, sigma=sigma)
        pos = subject_positions(model, prompt, subject)[-1]
        scores = [s + float(res.scores[layer, pos]) / len(items) for layer, s in enumerate(scores)]
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Probing localization
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """Per-layer linear-probe accuracy for decoding an attribute at the subject's last token."""

    train_accuracy: list[float]
    test_accuracy: list[float]
    layers: list[int]
    n_train: int
    n_test: int
    n_classes: int

    def lookup_layers(self, k: int = 2) -> list[int]:
        """The ``k`` layers where held-out decodability rises most (the fact-lookup layers): each layer's gain over
        the previous one (the embedding counts as chance)."""
        prev = [1.0 / self.n_classes] + self.test_accuracy[:-1]
        gains = [a - b for a, b in zip(self.test_accuracy, prev, strict=True)]
        return sorted(sorted(range(len(gains)), key=lambda i: -gains[i])[:k])


def subject_token_features(model: Model, prompts: Sequence[str], subjects: Sequence[str],
                           layers: Sequence[int] | None = None) -> Float[Tensor, "layer n d_model"]:
    """``layer n d_model``: the residual stream after each layer at each prompt's last subject token."""
    ids, mask = tokenize(model, list(prompts))
    sel = torch.zeros_like(mask, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, subjects, strict=True)):
        sel[i, subject_positions(model, p, s)[-1]] = True
    return cache_residuals(model, ids, attention_mask=mask, layers=layers, positions=sel, progress=False).acts.float()


def train_linear_probes(x: Float[Tensor, "probe n d"], y: Int[Tensor, " n"], train: Bool[Tensor, "probe n"],
                        n_classes: int, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0,
                        ) -> Callable[[Float[Tensor, "probe m d"]], Int[Tensor, "probe m"]]:
    """Independent multinomial logistic regressions, one per leading index (a layer, a fold), each fitted on its
    own ``train`` rows standardised by their own mean and std, all from the same initial weights (drawn from
    ``seed``). They are optimised together: Adam is elementwise and the loss a sum of per-probe means, so each
    probe gets exactly the updates it would get alone, in one loop instead of one per probe. Returns a predict
    function over ``probe m d``."""
    if not bool(train.any(1).all()):
        raise MechunError("every probe needs at least one training row")
    gen = torch.Generator().manual_seed(seed)
    t = train.to(x.dtype)[..., None]
    count = t.sum(1)
    mu = (x * t).sum(1) / count
    sd = ((((x - mu[:, None]) ** 2) * t).sum(1) / (count - 1).clamp_min(1)).sqrt().clamp_min(1e-6)
    xs = (x - mu[:, None]) / sd[:, None]
    w = (torch.randn(x.shape[2], n_classes, generator=gen) * 0.01).repeat(x.shape[0], 1, 1).requires_grad_(True)
    b = torch.zeros(x.shape[0], n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    targets = y.expand(x.shape[0], -1).flatten()
    weight = train.to(x.dtype) / train.sum(1, keepdim=True)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.baddbmm(b[:, None], xs, w)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
            loss = (ce.view_as(weight) * weight).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w, b = w.detach(), b.detach()
    return lambda z: torch.baddbmm(b[:, None], (z - mu[:, None]) / sd[:, None], w).argmax(-1)


def train_linear_probe(x: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int, steps: int = 300,
                       lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0
                       ) -> Callable[[Float[Tensor, "m d"]], Int[Tensor, " m"]]:
    """Multinomial logistic regression on standardised features; returns a predict function
    (:func:`train_linear_probes` with one probe)."""
    predict = train_linear_probes(x[None], y, torch.ones(1, x.shape[0], dtype=torch.bool), n_classes, steps, lr,
                                  weight_decay, seed)
    return lambda z: predict(z[None])[0]


def probe_layers(model: Model, prompts: Sequence[str], subjects: Sequence[str], labels: Sequence[int],
                 train: Sequence[bool], seed: int = 0) -> ProbeResult:
    """Train a probe per layer on the prompts marked ``train`` and test it on the others (held-out subjects)."""
    y = torch.tensor(list(labels))
    is_train = torch.tensor(list(train))
    if is_train.all() or not is_train.any():
        raise MechunError("probing needs both training and held-out prompts")
    feats = subject_token_features(model, prompts, subjects)
    n_classes = int(y.max()) + 1
    right = train_linear_probes(feats, y, is_train.expand(feats.shape[0], -1), n_classes, seed=seed)(feats) == y
    tr_acc = [float(r[is_train].float().mean()) for r in right]
    te_acc = [float(r[~is_train].float().mean()) for r in right]
    return ProbeResult(tr_acc, te_acc, list(range(feats.shape[0])), int(is_train.sum()), int((~is_train).sum()),
                       n_classes)


@dataclass
class HeadPatchingResult:
    """``scores[layer, position, head]``: the metric with that head's output (``hook_z``) patched in."""

    scores: Float[Tensor, "layer pos head"]
    tokens: list[str]
    clean_metric: float
    corrupt_metric: float

    def by_head(self) -> Float[Tensor, "layer head"]:
        """Patching a head at every position at once is not the sum of the per-position effects; this is the
        largest single-position effect per (layer, head), a quick map of which heads matter."""
        return (self.scores - self.corrupt_metric).abs().amax(1)


@torch.inference_mode()
def activation_patching_heads(model: Model, clean: PromptLike, corrupt: PromptLike, metric: Metric,
                              batch_size: int = 256) -> HeadPatchingResult:
    """Per-head activation patching of ``blocks.{l}.attn.hook_z`` by (layer, position, head): partial forwards
    where :mod:`mechun.partial` applies (as :func:`activation_patching`), batched whole forwards otherwise."""
    _check_batch_size(batch_size)
    ids_c, ids_x = _prompt_pair(model, clean, corrupt)
    tokens = model.tokenizer.convert_ids_to_tokens(ids_c[0])
    layers, n_heads = list(range(n_layers(model))), int(model.cfg.n_heads)
    sweep = (_partial_sweep(model, ids_c, ids_x, metric, "z", layers, n_heads, batch_size)
             or _bridge_sweep(model, ids_c, ids_x, metric, "z", layers, n_heads, batch_size))
    return HeadPatchingResult(sweep[0], tokens, sweep[1], sweep[2])
