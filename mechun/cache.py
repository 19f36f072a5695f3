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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechun.errors import MechunError
from mechun.hooks import FAST_KINDS, StopForward, bare_layer_hooks, hooks
from mechun.io import load_tensors, save_tensors
from mechun.models import (
    check_layer,
    check_same_model,
    hook_name,
    hook_points_in_use,
    model_device,
    model_fingerprint,
    n_layers,
    tokenize,
)

_FORMAT = "mechun.ResidualCache/1"


@dataclass
class ResidualCache:
    """Cached activations: ``acts[i]`` is layer ``layers[i]``; shape ``layer n d_model`` or ``layer n pos d_model``."""

    acts: Float[Tensor, "layer ..."]
    layers: list[int]
    hook_names: list[str]
    fingerprint: str
    positions: str
    prompts: list[str] | None = None
    mask: Bool[Tensor, "n pos"] | None = None  # for positions="all": which positions are real tokens
    index: Int[Tensor, "n 2"] | None = None  # for boolean-mask positions: (prompt, position) of each row
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.acts.shape[0] != len(self.layers):
            raise MechunError(f"acts has {self.acts.shape[0]} layers but {len(self.layers)} layer ids were given")

    def layer(self, layer: int) -> Tensor:
        """Activations of one model layer (by model layer number, not index into ``layers``)."""
        if layer not in self.layers:
            raise MechunError(f"layer {layer} is not in this cache; it holds layers {self.layers}")
        return self.acts[self.layers.index(layer)]

    def __getitem__(self, layer: int) -> Tensor:
        return self.layer(layer)

    def __len__(self) -> int:
        return self.acts.shape[1]

    @property
    def d_model(self) -> int:
        return self.acts.shape[-1]

    def check_model(self, model: Any) -> None:
        check_same_model(model, self.fingerprint, "this cache")

    def save(self, path: str | Path) -> Path:
        tensors = {"acts": self.acts}
        if self.mask is not None:
            tensors["mask"] = self.mask
        if self.index is not None:
            tensors["index"] = self.index
        header = {"format": _FORMAT, "layers": self.layers, "hook_names": self.hook_names,
                  "fingerprint": self.fingerprint, "positions": self.positions, "prompts": self.prompts,
                  "meta": self.meta}
        return save_tensors(path, tensors, "mechun", header)

    @classmethod
    def load(cls, path: str | Path) -> ResidualCache:
        t, header = load_tensors(path, "mechun", "ResidualCache")
        if header.get("format") != _FORMAT:
            raise MechunError(f"{path} has cache format {header.get('format')!r}; this mechun reads {_FORMAT}")
        return cls(acts=t["acts"], layers=header["layers"], hook_names=header["hook_names"],
                   fingerprint=header["fingerprint"], positions=header["positions"], prompts=header["prompts"],
                   mask=t.get("mask"), index=t.get("index"), meta=header.get("meta", {}))


def _select_positions(positions, mask: Tensor) -> tuple[str, Tensor | None]:
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


@torch.inference_mode()
def cache_residuals(
    model: Any,
    prompts_or_tokens: Sequence[str] | Int[Tensor, "batch pos"],
    layers: Sequence[int] | int | None = None,
    positions: str | int | Sequence[int] | Bool[Tensor, "batch pos"] = "last",
    batch_size: int = 32,
    progress: bool = True,
    hook: str = "resid_post",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    store_device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ResidualCache:
    """Cache the residual stream (``hook``: resid_post, resid_pre, resid_mid, mlp_out, attn_out) at ``layers``.

    Any active intervention (``project_out``, ``add_direction``) is reflected in the cache.
    """
    if isinstance(prompts_or_tokens, Tensor):
        ids = prompts_or_tokens
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[0] == 0:
            raise MechunError(f"tokens must be a non-empty integer tensor of shape batch x pos, got {tuple(ids.shape)}")
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        prompts = None
    else:
        prompts = list(prompts_or_tokens)
        ids, mask = tokenize(model, prompts)
    mask = mask.to(torch.long)
    n_total = ids.shape[0]

    if layers is None:
        layers = list(range(n_layers(model)))
    elif isinstance(layers, int):
        layers = [layers]
    if len(layers) == 0:
        raise MechunError("layers is empty; pass None for every layer or a list of layer numbers")
    layers = sorted({check_layer(model, layer) for layer in layers})
    names = [hook_name(model, hook, layer) for layer in layers]

    bool_mask = isinstance(positions, Tensor)
    if bool_mask:
        if positions.dtype != torch.bool or tuple(positions.shape) != tuple(ids.shape):
            raise MechunError(f"a positions mask must be bool of shape {tuple(ids.shape)} (batch x padded pos)")
        sel = (positions & mask.bool()).nonzero()
        desc, pos_idx = "mask", None
    else:
        desc, pos_idx = _select_positions(positions, mask)

    store_dtype = dtype or next(model.parameters()).dtype
    d = model.cfg.d_model
    if desc == "all":
        out = torch.zeros(len(layers), n_total, ids.shape[1], d, dtype=store_dtype, device=store_device)
    elif bool_mask:
        out = torch.zeros(len(layers), sel.shape[0], d, dtype=store_dtype, device=store_device)
    else:
        out = torch.zeros(len(layers), n_total, pos_idx.shape[1], d, dtype=store_dtype, device=store_device)

    dev = model_device(model)
    state: dict[str, Any] = {}

    def make_hook(li: int, last: bool):
        def fn(act: Tensor):
            rows, start = state["rows"], state["start"]
            if desc == "all":
                real = state["mask"][:, : act.shape[1], None].to(act.dtype)
                out[li, start:start + len(rows), : act.shape[1]] = (act * real).to(store_device, store_dtype)
            elif bool_mask:
                b_sel = state["sel"]
                out[li, state["sel_start"]:state["sel_start"] + len(b_sel)] = act[b_sel[:, 0], b_sel[:, 1]].to(
                    store_device, store_dtype)
            else:
                p = state["pos"]
                gathered = act[torch.arange(len(rows), device=act.device)[:, None], p]
                out[li, start:start + len(rows)] = gathered.to(store_device, store_dtype)
            if last:
                raise StopForward
        return fn

    fns = [make_hook(i, i == len(layers) - 1) for i in range(len(layers))]
    # Fast path: with no hook on any hook point (no intervention active), run the unwrapped HF model with hooks on
    # its decoder layers -- the cost of a plain transformers forward. Otherwise run the bridge, so that every
    # active hook (project_out, add_direction, the user's own) shapes what is cached.
    if hook in FAST_KINDS and not hook_points_in_use(model):
        scope = bare_layer_hooks(model, [(layer, hook, fn) for layer, fn in zip(layers, fns, strict=True)])
    else:
        scope = hooks(model, list(zip(names, fns, strict=True)))
    batches = range(0, n_total, batch_size)
    sel_start = 0
    with scope as bare:
        forward = bare if bare is not None else model
        for start in tqdm(batches, desc="caching residuals", disable=not progress or len(batches) < 2):
            rows = torch.arange(start, min(start + batch_size, n_total))
            b_mask = mask[rows]
            width = int(b_mask.sum(1).max())
            state.update(rows=rows, start=start, mask=b_mask.to(dev))
            if bool_mask:
                b_sel = sel[(sel[:, 0] >= start) & (sel[:, 0] < start + len(rows))].clone()
                b_sel[:, 0] -= start
                state.update(sel=b_sel.to(dev), sel_start=sel_start)
                sel_start += len(b_sel)
            elif pos_idx is not None:
                state["pos"] = pos_idx[rows].to(dev)
            try:
                if bare is not None:
                    forward(input_ids=ids[rows, :width].to(dev), attention_mask=b_mask[:, :width].to(dev),
                            use_cache=False)
                else:
                    forward(ids[rows, :width].to(dev), attention_mask=b_mask[:, :width].to(dev))
            except StopForward:
                pass
    if desc not in ("all", "mask"):
        out = out[:, :, 0] if (desc == "last" or isinstance(positions, int)) else out
    return ResidualCache(
        acts=out, layers=layers, hook_names=names, fingerprint=model_fingerprint(model), positions=desc,
        prompts=prompts, mask=mask.bool() if desc == "all" else None, index=sel if bool_mask else None,
        meta={"hook": hook},
    )
