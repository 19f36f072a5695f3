"""Residual-stream caching: the activations at chosen layers and positions, for many prompts, in bounded memory.

``run_with_cache`` keeps every activation of every hook for the whole batch. For unlearning analyses we usually
want one hook kind (the residual stream after each block) at one position (the last token, the subject's last
token) over thousands of prompts. :func:`cache_residuals` therefore

* hooks only the requested layers, and copies only the requested positions out of each activation;
* writes into one preallocated tensor (on ``store_device``, CPU by default), so memory is what is kept;
* ends each forward pass right after the last requested layer (nothing downstream is computed);
* records the layers, hook names, prompts and the model fingerprint, so a cache is never silently used with
  another model. :meth:`ResidualCache.save` / :meth:`ResidualCache.load` use safetensors.

Positions are one of ``"last"`` (each prompt's last real token), ``"all"`` (a position axis, padded; see
``ResidualCache.mask``), an int or list of ints (indices into each prompt's own tokens, negative from its end), or a
boolean ``batch pos`` mask over the padded tokens (selected tokens are flattened; ``ResidualCache.index`` says which
prompt and position each came from).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechun.errors import MechunError
from mechun.hooks import FAST_KINDS, StopForward, bare_layer_hooks, hooks
from mechun.io import check_out_file, load_tensors, save_tensors, tensors_header
from mechun.models import (
    HookKind,
    Model,
    check_layer,
    check_same_model,
    check_token_ids,
    foreign_hooks_present,
    hook_name,
    model_device,
    model_fingerprint,
    n_layers,
    tokenize,
)
from mechun.progress import progress_bar

_FORMAT = "mechun.ResidualCache/1"

#: The named position choices of :func:`cache_residuals` (besides ints, lists of ints and a boolean mask).
PositionKind = Literal["last", "all"]
POSITION_KINDS: tuple[PositionKind, ...] = get_args(PositionKind)


@dataclass
class ResidualCache:
    """Cached activations: ``acts[i]`` is layer ``layers[i]``; shape ``layer n d_model``, or ``layer n k d_model``
    with a position axis ``k`` (``positions="all"``: the padded positions; a list of positions: one per entry).

    ``positions`` says which: ``"last"``, ``"all"``, ``"mask"`` (a boolean mask; ``n`` counts the selected tokens)
    or ``"positions=[...]"``."""

    acts: Float[Tensor, "layer n *k d_model"]
    layers: list[int]
    hook_names: list[str]
    fingerprint: str
    positions: str
    prompts: list[str] | None = None
    mask: Bool[Tensor, "n pos"] | None = None  # for positions="all": which positions are real tokens
    index: Int[Tensor, "n 2"] | None = None  # for boolean-mask positions: (prompt, position) of each row
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable (saved in the file's header)

    def __post_init__(self) -> None:
        if self.acts.shape[0] != len(self.layers):
            raise MechunError(f"acts has {self.acts.shape[0]} layers but {len(self.layers)} layer ids were given")

    def layer(self, layer: int) -> Float[Tensor, "n *k d_model"]:
        """Activations of one model layer (by model layer number, not index into ``layers``)."""
        if layer not in self.layers:
            raise MechunError(f"layer {layer} is not in this cache; it holds layers {self.layers}")
        return self.acts[self.layers.index(layer)]

    def __getitem__(self, layer: int) -> Float[Tensor, "n *k d_model"]:
        return self.layer(layer)

    def __len__(self) -> int:
        return self.acts.shape[1]

    @property
    def d_model(self) -> int:
        return self.acts.shape[-1]

    def check_model(self, model: Model) -> None:
        check_same_model(model, self.fingerprint, "this cache")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a safetensors file, whole or not at all. An existing file is replaced only with ``overwrite`` and
        only if it is a mechun cache (a checkpoint's ``model.safetensors`` never is)."""
        check_out_file(path, overwrite, is_mine=is_cache_file, option="path", need_bytes=self.nbytes())
        tensors = {"acts": self.acts}
        if self.mask is not None:
            tensors["mask"] = self.mask
        if self.index is not None:
            tensors["index"] = self.index
        header = {"format": _FORMAT, "layers": self.layers, "hook_names": self.hook_names,
                  "fingerprint": self.fingerprint, "positions": self.positions, "prompts": self.prompts,
                  "meta": self.meta}
        return save_tensors(path, tensors, "mechun", header)

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("ResidualCache", n=len(self), layers=self.layers, positions=self.positions,
                          shape=tuple(self.acts.shape), dtype=str(self.acts.dtype).replace("torch.", ""),
                          fingerprint=self.fingerprint[:12])

    def _repr_html_(self) -> str:
        from mechun.display import frame, svg_lines, table

        acts = self.acts.float()
        if self.positions == "all" and self.mask is not None and acts.ndim == 4:
            norms = (acts.norm(dim=-1) * self.mask[None]).sum((1, 2)) / self.mask.sum().clamp_min(1)
        else:
            norms = acts.norm(dim=-1).flatten(1).mean(1)
        rows = [{"prompts": len(self.prompts) if self.prompts is not None else "?", "rows (n)": len(self),
                 "layers": f"{self.layers[0]}..{self.layers[-1]} ({len(self.layers)})" if self.layers else "none",
                 "positions": self.positions, "shape": "x".join(map(str, self.acts.shape)),
                 "dtype": str(self.acts.dtype).replace("torch.", ""), "MB": self.nbytes() / 1e6,
                 "model": self.fingerprint[:12]}]
        first = f"<div style='color:#555'>first prompt: {html.escape(self.prompts[0][:90])}</div>" if self.prompts else ""
        chart = svg_lines({"mean residual norm": norms.tolist()}, x_label="cached layer (index)") if len(norms) > 1 else ""
        return frame("ResidualCache", table(rows, digits=1), first, chart,
                     hint="cache[layer] -> activations of one layer; .save(path) / ResidualCache.load(path)")

    def nbytes(self) -> int:
        """About the size of the saved file."""
        return sum(t.numel() * t.element_size() for t in (self.acts, self.mask, self.index) if t is not None) + 65536

    @classmethod
    def load(cls, path: str | Path) -> ResidualCache:
        t, header = load_tensors(path, "mechun", "ResidualCache")
        if header.get("format") != _FORMAT:
            raise MechunError(f"{path} has cache format {header.get('format')!r}; this mechun reads {_FORMAT}")
        return cls(acts=t["acts"], layers=header["layers"], hook_names=header["hook_names"],
                   fingerprint=header["fingerprint"], positions=header["positions"], prompts=header["prompts"],
                   mask=t.get("mask"), index=t.get("index"), meta=header.get("meta", {}))


def is_cache_file(path: str | Path) -> bool:
    """Whether ``path`` is a :class:`ResidualCache` file that mechun wrote."""
    return (tensors_header(path, "mechun") or {}).get("format") == _FORMAT


def _select_positions(positions: str | int | Sequence[int], mask: Int[Tensor, "batch pos"],
                      ) -> tuple[str, Int[Tensor, "batch k"] | None]:
    """Per prompt row, the padded-token indices to keep (``n k``), or None for "all"/boolean masks."""
    lengths = mask.sum(1)
    if isinstance(positions, str):
        if positions == "last":
            return "last", (lengths - 1)[:, None]
        if positions == "all":
            return "all", None
        raise MechunError(f"positions must be 'last', 'all', an int, a list of ints or a bool mask; got {positions!r}")
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, Sequence) and all(isinstance(p, int) for p in positions) and len(positions) > 0:
        pos = torch.tensor(positions)[None, :].expand(len(lengths), -1)
        pos = torch.where(pos < 0, pos + lengths[:, None], pos)
        if bool(((pos < 0) | (pos >= lengths[:, None])).any()):
            raise MechunError(f"positions {list(positions)} fall outside a prompt of {int(lengths.min())} tokens")
        return f"positions={list(positions)}", pos
    raise MechunError(f"positions must be 'last', 'all', an int, a list of ints or a bool mask; got {positions!r}")


def _inputs(model: Model, prompts_or_tokens: Sequence[str] | Int[Tensor, "batch pos"],
            attention_mask: Int[Tensor, "batch pos"] | None,
            ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], list[str] | None]:
    """Token ids, the (long) attention mask, and the prompts (None when tokens were given)."""
    if isinstance(prompts_or_tokens, Tensor):
        ids = prompts_or_tokens
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[0] == 0:
            raise MechunError(f"tokens must be a non-empty integer tensor of shape batch x pos, got {tuple(ids.shape)}")
        check_token_ids(model, ids)
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        prompts = None
    else:  # one string is one prompt (as in TransformerLens), never a sequence of one-letter prompts
        prompts = [prompts_or_tokens] if isinstance(prompts_or_tokens, str) else list(prompts_or_tokens)
        ids, mask = tokenize(model, prompts)
    return ids, mask.to(torch.long), prompts


def _resolve_layers(model: Model, layers: Sequence[int] | int | None) -> list[int]:
    """The requested layers, checked, deduplicated and sorted (None: every layer)."""
    if layers is None:
        layers = list(range(n_layers(model)))
    elif isinstance(layers, int):
        layers = [layers]
    if len(layers) == 0:
        raise MechunError("layers is empty; pass None for every layer or a list of layer numbers")
    return sorted({check_layer(model, layer) for layer in layers})


def _selection(positions: str | int | Sequence[int] | Tensor, ids: Tensor, mask: Int[Tensor, "batch pos"],
               ) -> tuple[str, Int[Tensor, "batch k"] | None, Int[Tensor, "n 2"] | None]:
    """The positions' description, per-row indices to keep, and a boolean mask's selected (prompt, position) pairs."""
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or tuple(positions.shape) != tuple(ids.shape):
            raise MechunError(f"a positions mask must be bool of shape {tuple(ids.shape)} (batch x padded pos)")
        return "mask", None, (positions & mask.bool()).nonzero()
    desc, pos_idx = _select_positions(positions, mask)
    return desc, pos_idx, None


def _store_shape(desc: str, ids: Tensor, pos_idx: Tensor | None, sel: Tensor | None) -> tuple[int, ...]:
    """Per-layer shape of the stored activations before ``d_model``: ``n pos``, ``n_selected`` or ``n k``."""
    if desc == "all":
        return (ids.shape[0], ids.shape[1])
    if sel is not None:
        return (sel.shape[0],)
    return (ids.shape[0], pos_idx.shape[1])


class _Collector:
    """Hook functions that copy each batch's selected positions into one preallocated ``out`` tensor."""

    def __init__(self, out: Tensor, desc: str, pos_idx: Tensor | None, sel: Tensor | None, device: torch.device):
        self.out, self.desc, self.pos_idx, self.sel, self.device = out, desc, pos_idx, sel, device
        self.n_sel = 0  # selected tokens (boolean-mask positions) written by earlier batches

    def start_batch(self, rows: Tensor, start: int, b_mask: Tensor) -> None:
        """Say which rows the next forward pass covers (and their mask, positions or selected tokens)."""
        self.rows, self.start, self.b_mask = rows, start, b_mask.to(self.device)
        if self.sel is not None:
            b_sel = self.sel[(self.sel[:, 0] >= start) & (self.sel[:, 0] < start + len(rows))].clone()
            b_sel[:, 0] -= start
            self.b_sel, self.sel_at = b_sel.to(self.device), self.n_sel
            self.n_sel += len(b_sel)
        elif self.pos_idx is not None:
            self.pos = self.pos_idx[rows].to(self.device)

    def hook(self, li: int, last: bool) -> Callable[[Tensor], None]:
        """The hook writing into layer index ``li``; the last layer's hook also ends the forward pass."""
        out = self.out

        def fn(act: Tensor) -> None:
            rows, start = self.rows, self.start
            if self.desc == "all":
                real = self.b_mask[:, : act.shape[1], None].to(act.dtype)
                out[li, start:start + len(rows), : act.shape[1]] = (act * real).to(out.device, out.dtype)
            elif self.desc == "mask":
                b_sel = self.b_sel
                out[li, self.sel_at:self.sel_at + len(b_sel)] = act[b_sel[:, 0], b_sel[:, 1]].to(out.device, out.dtype)
            else:
                gathered = act[torch.arange(len(rows), device=act.device)[:, None], self.pos]
                out[li, start:start + len(rows)] = gathered.to(out.device, out.dtype)
            if last:
                raise StopForward
        return fn


def _hook_scope(model: Model, hook: str, layers: list[int], names: list[str], fns: list[Callable[[Tensor], None]],
                ) -> AbstractContextManager[torch.nn.Module | None]:
    """The context that installs ``fns``; it yields the bare HF model on the fast path, else None."""
    # Fast path: with no hook on any of the bridge's modules (no intervention active), run the unwrapped HF model
    # with hooks on its decoder layers -- the cost of a plain transformers forward. Otherwise run the bridge, so that
    # every active hook (project_out, add_direction, the user's own on a hook point or any module) shapes the cache.
    if hook in FAST_KINDS and not foreign_hooks_present(model):
        return bare_layer_hooks(model, [(layer, hook, fn) for layer, fn in zip(layers, fns, strict=True)])
    return hooks(model, list(zip(names, fns, strict=True)))


def _forward(model: Model, bare: torch.nn.Module | None, ids: Tensor, rows: Tensor, b_mask: Tensor,
             dev: torch.device) -> None:
    """One forward pass over ``rows``, trimmed to their longest prompt; the last layer's hook may end it early."""
    width = int(b_mask.sum(1).max())
    try:
        if bare is not None:
            bare(input_ids=ids[rows, :width].to(dev), attention_mask=b_mask[:, :width].to(dev), use_cache=False)
        else:
            model(ids[rows, :width].to(dev), attention_mask=b_mask[:, :width].to(dev))
    except StopForward:
        pass


@torch.inference_mode()
def cache_residuals(
    model: Model,
    prompts_or_tokens: Sequence[str] | Int[Tensor, "batch pos"],
    layers: Sequence[int] | int | None = None,
    positions: PositionKind | str | int | Sequence[int] | Bool[Tensor, "batch pos"] = "last",
    batch_size: int = 32,
    progress: bool = True,
    hook: HookKind | str = "resid_post",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    store_device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ResidualCache:
    """Cache the residual stream (``hook``: resid_post, resid_pre, resid_mid, mlp_out, attn_out) at ``layers``.

    Any active intervention (``project_out``, ``add_direction``) is reflected in the cache. ``hook`` and
    ``positions`` take any string, so that a typo gets a :class:`MechunError` naming the choices
    (:data:`mechun.models.HOOK_KINDS`, :data:`POSITION_KINDS`).
    """
    ids, mask, prompts = _inputs(model, prompts_or_tokens, attention_mask)
    n_total = ids.shape[0]
    layers = _resolve_layers(model, layers)
    names = [hook_name(model, hook, layer) for layer in layers]
    desc, pos_idx, sel = _selection(positions, ids, mask)
    store_dtype = dtype or next(model.parameters()).dtype
    out = torch.zeros(len(layers), *_store_shape(desc, ids, pos_idx, sel), model.cfg.d_model, dtype=store_dtype,
                      device=store_device)
    dev = model_device(model)
    collector = _Collector(out, desc, pos_idx, sel, dev)
    fns = [collector.hook(i, i == len(layers) - 1) for i in range(len(layers))]
    batches = range(0, n_total, batch_size)
    with _hook_scope(model, hook, layers, names, fns) as bare:
        for start in progress_bar(batches, desc="caching residuals", disable=not progress or len(batches) < 2):
            rows = torch.arange(start, min(start + batch_size, n_total))
            b_mask = mask[rows]
            collector.start_batch(rows, start, b_mask)
            _forward(model, bare, ids, rows, b_mask, dev)
    if desc not in ("all", "mask"):
        out = out[:, :, 0] if (desc == "last" or isinstance(positions, int)) else out
    return ResidualCache(
        acts=out, layers=layers, hook_names=names, fingerprint=model_fingerprint(model), positions=desc,
        prompts=prompts, mask=mask.bool() if desc == "all" else None, index=sel,
        meta={"hook": hook},
    )
