"""Partial forwards: what a patch can change, recomputed; everything else reused.

Activation patching asks, for every layer ``l`` and position ``p``, what the metric becomes when one activation of
the *corrupt* run is replaced by its value from the *clean* run. A patch at ``(l, p)`` cannot change anything
before layer ``l`` (layers run in order) nor anything at a position before ``p`` (attention is causal). So a
patched run needs only decoder layers ``l .. L-1``, only at positions ``p .. P-1``: the residual stream entering
layer ``l`` and the keys and values of positions ``< p`` at every later layer are the corrupt run's, recorded once.
And a metric read at the last position needs the unembedding there only (the LM head is about a third of a GPT-2
forward). Summed over a sweep, that is about a quarter of the body's FLOPs per patch, against a whole forward per
patch for TransformerLens' ``patching`` module.

:class:`PartialForward` runs the unwrapped Hugging Face decoder layers directly (:func:`mechun.models.bare_forward_view`,
the same weights), calling each layer with the arguments the model itself passed it on the corrupt prompt -- the
attention mask, rotary position embeddings, position ids -- rebuilt for the tokens computed, and with a small cache
object that puts the corrupt run's keys and values in front of the new ones (:class:`_PrefixCache`; every attention
module of the supported architectures goes through ``cache.update``). All rows of a sweep share each layer's call:
a row joins at its own layer, entering with the corrupt residual stream at its positions, and is patched there; the
rows' windows are packed into sequences no longer than the prompt (first fit, longest first), and the mask lets each
token see the corrupt keys before its row's patch position and its own row's tokens, within whatever the model's
own mask allows (causal; Gemma-2's sliding window). Packing keeps the matrix products large: on a CPU, a small
batch per position would cost more time than the FLOPs it saves.

The path is used for the architectures the tests check it on (:data:`PARTIAL_ARCHITECTURES`), on one device, and
only while no module of the bridge has a foreign hook (a user's hook would not fire here); :func:`partial_forward`
returns ``None`` otherwise and callers fall back to batched whole forwards through the bridge. Nothing here changes
a weight; every torch hook it adds is removed on exit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechun.errors import MechunError
from mechun.hooks import hooks, site_hook
from mechun.models import (
    Model,
    bare_counterpart,
    bare_forward_view,
    bare_module,
    foreign_hooks_present,
    hf_config,
    hf_model,
    layer_output,
)

#: Architectures whose decoder layers :class:`PartialForward` is tested to call correctly (equal to
#: TransformerLens' patching within 1e-4 in the tests).
PARTIAL_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM")

#: Names a decoder layer's cache argument has had across ``transformers`` versions.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
#: Layer arguments with a position axis: rebuilt for the packed tokens of a partial forward (``cache_position``,
#: which only a real cache reads, is dropped).
_POSITIONAL = ("attention_mask", "position_ids", "cache_position", "position_embeddings")
#: The attribute that marks a metric as reading the last position only (see :func:`reads_last_position`).
LAST_POSITION_ATTR = "mechun_last_position"

Side = Literal["in", "out"]


def reads_last_position(metric: Callable) -> bool:
    """Whether ``metric`` declared that it reads the logits at the last position only (the metrics of
    :mod:`mechun.localize` do, by a ``mechun_last_position`` attribute); such a metric is given ``batch 1 vocab``
    logits, others the whole ``batch pos vocab``."""
    return bool(getattr(metric, LAST_POSITION_ATTR, False))


def metric_values(metric: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """``metric(logits)`` as ``batch`` floats, or a :class:`MechunError` saying what a metric must return."""
    out = metric(logits)
    if not isinstance(out, Tensor) or out.shape != logits.shape[:1]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise MechunError(f"the metric returned {shape} for logits of shape {tuple(logits.shape)}; a metric maps "
                          "batch x pos x vocab logits to one number per batch row (shape [batch]), e.g. "
                          "logits[:, -1, a] - logits[:, -1, b]")
    return out.float()


def check_last_position(metric: Callable[[Tensor], Tensor], logits: Float[Tensor, "1 pos vocab"]) -> None:
    """A metric marked by :func:`last_position` must give the same number on the last position's logits alone."""
    if not reads_last_position(metric) or logits.shape[1] == 1:
        return
    whole = metric_values(metric, logits)
    try:
        last = metric_values(metric, logits[:, -1:])
    except (IndexError, RuntimeError) as e:
        raise MechunError(f"the metric is marked last_position but fails on the last position's logits alone ({e}); "
                          "mark only metrics that read logits[:, -1]") from e
    if not torch.allclose(whole, last, rtol=1e-4, atol=1e-5):
        raise MechunError(f"the metric is marked last_position but reads other positions too ({float(whole[0]):.4g} "
                          f"on all logits, {float(last[0]):.4g} on the last position's); drop last_position() for it")


class _PrefixCache:
    """Stands in for ``transformers``' ``Cache`` inside a partial forward: each attention layer hands its new keys and
    values to ``update`` and attends to what it returns. Recording (``prefix=None``): stores them and returns them.
    Replaying: returns the recorded keys and values of the corrupt run (every position), repeated over the batch,
    followed by the new ones; the mask says which of them each query may see."""

    def __init__(self, prefix: dict[int, tuple[Tensor, Tensor]] | None = None):
        self.recorded: dict[int, tuple[Tensor, Tensor]] = {}
        self.prefix = prefix

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.prefix is None:
            self.recorded[layer_idx] = (key, value)
            return key, value
        k, v = self.prefix[layer_idx]
        rows = key.shape[0]
        return (torch.cat([k.expand(rows, -1, -1, -1), key], dim=-2),
                torch.cat([v.expand(rows, -1, -1, -1), value], dim=-2))


class Unsupported(Exception):
    """This model or call cannot take the partial path (the caller falls back to whole forwards)."""


@dataclass
class Patch:
    """One patched run: at ``layer``, ``position``, the activation of the hook (head ``head`` of it, for per-head
    patching of ``hook_z``) set to ``value``."""

    layer: int
    position: int
    value: Tensor
    head: int | None = None


def _flat_arguments(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    bound = sig.bind(*args, **kwargs)
    flat = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


class PartialForward:
    """The corrupt prompt's run recorded layer by layer, ready for patched partial forwards (:meth:`run`)."""

    def __init__(self, model: Model, ids: Int[Tensor, "1 pos"]):
        self.model = model
        self.bare, self.layers = bare_forward_view(model)
        self.n_pos = ids.shape[1]
        self.sigs = [inspect.signature(layer.forward) for layer in self.layers]
        self.cache_arg = next((a for a in _CACHE_ARGS if a in self.sigs[0].parameters), None)
        if self.cache_arg is None:
            raise Unsupported("decoder layers take no cache argument")
        self.calls: list[dict] = [{} for _ in self.layers]
        self.inputs: list[Tensor] = [torch.empty(0)] * len(self.layers)
        recorder = _PrefixCache()
        handles = []

        def capture(i: int):
            def hook(mod, args, kwargs):
                flat = _flat_arguments(self.sigs[i], args, kwargs)
                hidden = flat.pop("hidden_states")
                self.inputs[i] = hidden
                for name, value in flat.items():
                    if name == self.cache_arg or name in _POSITIONAL or value is None or isinstance(value, bool):
                        continue
                    if isinstance(value, Tensor | tuple | list | dict):
                        raise Unsupported(f"decoder layer argument {name!r} is not understood")
                mask = flat.get("attention_mask")
                if not (isinstance(mask, Tensor) and mask.ndim == 4 and mask.shape[-2] == self.n_pos):
                    raise Unsupported("the layers get no materialised 4-d attention mask")
                self.calls[i] = {k: v for k, v in flat.items() if k != self.cache_arg}
                return (), {**flat, "hidden_states": hidden, self.cache_arg: recorder}
            return hook

        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(capture(i), with_kwargs=True))
            with torch.inference_mode():
                self.logits = self.bare(ids.to(next(self.bare.parameters()).device), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        if len(recorder.recorded) != len(self.layers):
            raise Unsupported("not every attention layer went through the cache")
        self.kv = recorder.recorded
        masks = [call["attention_mask"][0, 0] for call in self.calls]
        self.mask_dtype = masks[0].dtype if masks[0].is_floating_point() else self.inputs[0].dtype
        self.allowed = [m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2 for m in masks]
        self.norm = bare_counterpart(model, model.ln_final)

    def unembed(self, hidden: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the last layer's output (final norm, LM head, logit soft-capping where the model has it)."""
        return head_logits(self.model, self.norm(hidden))

    def _layer(self, layer: int, hidden: Tensor, pos: Tensor, start: Tensor, row: Tensor) -> Tensor:
        """Decoder layer ``layer`` on packed windows: ``hidden`` is ``seq T d``; token ``(b, t)`` belongs to row
        ``row[b, t]`` (``-1``: padding), sits at absolute position ``pos[b, t]`` and its row is patched from position
        ``start[b, t]``. A query sees the corrupt run's keys before its row's start and its own row's keys, as far as
        the model's own mask allows (causal, sliding window)."""
        allowed = self.allowed[layer]  # query position x key position
        p = pos.clamp_min(0)
        prefix = allowed[p] & (torch.arange(self.n_pos, device=pos.device) < start[..., None])
        own = (row[:, :, None] == row[:, None, :]) & allowed[p[:, :, None], p[:, None, :]]
        visible = torch.cat([prefix, own], dim=-1)
        visible[..., 0] |= row < 0  # padding queries look at one key (their output is never read)
        mask = torch.zeros(visible.shape, dtype=self.mask_dtype, device=pos.device)
        mask.masked_fill_(~visible, torch.finfo(self.mask_dtype).min)
        kwargs = {}
        for name, value in self.calls[layer].items():
            if name == "attention_mask":
                value = mask[:, None]
            elif name == "position_embeddings":
                value = tuple(x[0][p] for x in value)
            elif name == "position_ids":
                value = p
            elif name == "cache_position":
                continue
            kwargs[name] = value
        cache = _PrefixCache(self.kv)
        return layer_output(self.layers[layer](hidden_states=hidden, **kwargs, **{self.cache_arg: cache}))

    @torch.inference_mode()
    def run(self, site: Callable[[int], tuple[nn.Module, Side]], patches: Sequence[Patch],
            metric: Callable[[Tensor], Tensor], n_heads: int | None = None) -> Float[Tensor, " n"]:
        """The metric of each patched run. Row ``i`` (``patches[i]``) enters at its own layer with the corrupt
        residual stream at positions ``position ..`` and is patched there; the rows of every layer and position
        share each layer's call, their windows packed into sequences no longer than the longest window.
        ``site(layer)`` gives the module (and its input or output) a patch at that layer writes to."""
        dev = self.inputs[0].device
        n, P = len(patches), self.n_pos
        tokens = self.inputs[0].new_empty(0, self.inputs[0].shape[-1])
        tok_row = torch.empty(0, dtype=torch.long, device=dev)  # the row each active token belongs to
        tok_pos = torch.empty(0, dtype=torch.long, device=dev)  # its absolute position
        starts = torch.tensor([p.position for p in patches], device=dev)
        for layer in range(min(p.layer for p in patches), len(self.layers)):
            joining = [i for i, p in enumerate(patches) if p.layer == layer]
            if joining:
                windows = [torch.arange(patches[i].position, P, device=dev) for i in joining]
                firsts = [len(tok_row) + sum(len(w) for w in windows[:j]) for j in range(len(joining))]
                tokens = torch.cat([tokens, *(self.inputs[layer][0, w] for w in windows)])
                tok_row = torch.cat([tok_row, *(torch.full_like(w, i) for i, w in zip(joining, windows, strict=True))])
                tok_pos = torch.cat([tok_pos, *windows])
                packed = _pack(tok_row)
                unpack = _unpack(packed)
                slot = packed.flatten()
                real = slot >= 0
                row = torch.where(real, tok_row[slot.clamp_min(0)], -1).view(packed.shape)
                pos = torch.where(real, tok_pos[slot.clamp_min(0)], -1).view(packed.shape)
                start = starts[row.clamp_min(0)]
            hidden = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[-1])])[slot].view(*packed.shape, -1)
            if joining:
                at = unpack[torch.tensor(firsts, device=dev)]  # where each joining row's patch token sits
                module, side = site(layer)
                writer = _writer([patches[i] for i in joining], at // packed.shape[1], at % packed.shape[1], n_heads)
                with site_hook(module, side, writer):
                    out = self._layer(layer, hidden, pos, start, row)
            else:
                out = self._layer(layer, hidden, pos, start, row)
            tokens = out.reshape(-1, out.shape[-1])[unpack]
        if reads_last_position(metric):
            last = torch.empty(n, dtype=torch.long, device=dev)
            is_last = tok_pos == P - 1
            last[tok_row[is_last]] = is_last.nonzero()[:, 0]
            return metric_values(metric, self.unembed(tokens[last][:, None])).cpu()
        out = torch.empty(n)
        for lo in range(0, n, 16):  # whole logits for a metric that reads other positions: corrupt before the patch
            rows = range(lo, min(n, lo + 16))
            logits = self.logits.expand(len(rows), -1, -1).clone()
            for j, i in enumerate(rows):
                mine = tok_row == i
                logits[j, tok_pos[mine]] = self.unembed(tokens[mine][None])[0]
            out[lo:lo + len(rows)] = metric_values(metric, logits).cpu()
        return out


def _pack(tok_row: Tensor) -> Tensor:
    """Sequences of whole rows' windows, first fit by decreasing length, each at most as long as the longest
    window: ``seq T`` indices into the active tokens (``-1``: padding)."""
    rows, counts = torch.unique_consecutive(tok_row, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    capacity = int(counts.max())
    bins: list[list[int]] = []
    fill: list[int] = []
    for r in sorted(range(len(rows)), key=lambda r: -int(counts[r])):
        c = int(counts[r])
        b = next((b for b in range(len(bins)) if fill[b] + c <= capacity), None)
        if b is None:
            bins.append([])
            fill.append(0)
            b = len(bins) - 1
        bins[b] += range(int(first[r]), int(first[r]) + c)
        fill[b] += c
    out = torch.full((len(bins), capacity), -1, dtype=torch.long)
    for b, idx in enumerate(bins):
        out[b, :len(idx)] = torch.tensor(idx)
    return out.to(tok_row.device)


def _unpack(packed: Tensor) -> Tensor:
    """Where each active token (in order) sits in the flattened packed layout."""
    flat = packed.flatten()
    where = torch.empty(int((flat >= 0).sum()), dtype=torch.long, device=flat.device)
    where[flat[flat >= 0]] = (flat >= 0).nonzero()[:, 0]
    return where


def _writer(joining: Sequence[Patch], seq: Tensor, slot: Tensor, n_heads: int | None) -> Callable[[Tensor], Tensor]:
    """Sets the activation at each joining row's patch token (sequence ``seq``, slot ``slot``) to its value."""
    values = torch.stack([p.value for p in joining])

    def fn(act: Tensor) -> Tensor:
        act = act.clone()
        if n_heads is None:
            act[seq, slot] = values.to(act.device, act.dtype)
        else:
            heads = torch.tensor([p.head for p in joining], device=act.device)
            act.view(*act.shape[:2], n_heads, -1)[seq, slot, heads] = values.to(act.device, act.dtype)
        return act
    return fn


def head_logits(model: Model, normed: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos vocab"]:
    """Logits of final-normed hidden states (what the HF body returns): the LM head, then Gemma-2's final logit
    soft-capping where the config has it."""
    logits = bare_counterpart(model, model.unembed)(normed)
    cap = getattr(hf_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def tapped_metric(model: Model, ids: Int[Tensor, "batch pos"], taps: dict[str, Callable[[Tensor], Tensor | None]],
                  metric: Callable[[Tensor], Tensor], check: bool = False) -> Tensor:
    """``metric`` of a forward on ``ids`` with ``taps`` (hook name -> function) reading or replacing activations.

    With no foreign hook on the bridge, the forward runs through the bare HF modules with the taps on the modules the
    hook points stand for (:func:`mechun.models.bare_module`), and for a metric that reads only the last position
    (:func:`reads_last_position`) the LM head runs there alone; otherwise through the bridge's hook points. Same
    numbers either way; gradients flow where the caller enables them. ``check``: refuse a metric marked
    last-position that reads other positions (:func:`check_last_position`; on the bare path it is given the last two
    positions' logits, enough to tell, at two positions' cost of the LM head)."""
    if foreign_hooks_present(model):
        with hooks(model, list(taps.items())):
            logits = model(ids)
            if check:
                check_last_position(metric, logits)
            return metric_values(metric, logits)
    bare, _ = bare_forward_view(model)
    with ExitStack() as stack:
        for name, fn in taps.items():
            stack.enter_context(site_hook(*bare_module(model, name), fn))
        hidden = bare.base_model(ids, use_cache=False).last_hidden_state  # final-normed
    if not reads_last_position(metric):
        return metric_values(metric, head_logits(model, hidden))
    tail = head_logits(model, hidden[:, -2:] if check else hidden[:, -1:])
    if check:
        check_last_position(metric, tail)
    return metric_values(metric, tail[:, -1:])


def partial_forward(model: Model, ids: Int[Tensor, "1 pos"]) -> PartialForward | None:
    """A :class:`PartialForward` over the corrupt prompt ``ids``, or ``None`` where the partial path does not apply
    (an architecture outside :data:`PARTIAL_ARCHITECTURES`, a hook on some hook point, weights spread over several
    devices, or layers called in a way it does not know)."""
    if foreign_hooks_present(model) or type(hf_model(model)).__name__ not in PARTIAL_ARCHITECTURES:
        return None
    if len({p.device for p in model.parameters()}) > 1:  # spread over devices (device_map): untested here
        return None
    try:
        return PartialForward(model, ids)
    except Unsupported:
        return None
