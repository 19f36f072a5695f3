"""Interventions on the residual stream, as context managers: project a direction out, or add one.

Directional ablation is the tool behind the RMU "junk direction" diagnosis (and refusal-direction work before it):
if unlearning works by pushing forget-domain activations along one direction, removing the component of every
activation along that direction should undo it. For a unit vector d, ablation maps ``x -> x - (x . d) d``; for
several directions it removes their span. Addition maps ``x -> x + coeff * v`` (the vector as given, not
normalised, so a steering vector ``c * u`` can be added exactly).

Both validate the direction against the model (``d_model``, finite, non-zero, and -- when it is a
:class:`Direction` that records a fingerprint -- computed on this model), cast it to each activation's dtype and
device, and remove their hooks in ``finally``. Nothing here touches the weights.

``layers`` defaults to every layer; ``positions`` to every token (``None``), or an int / list of ints / slice of
the padded sequence, or a boolean ``batch pos`` mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from mechun.errors import MechunError
from mechun.hooks import hooks
from mechun.io import check_out_file, load_tensors, save_tensors, tensors_header
from mechun.models import HookKind, Model, check_layer, check_same_model, d_model, hook_name, n_layers

Intervention = Callable[[], AbstractContextManager]
"""A factory of a hook context (``lambda: sae_intervention(model, sae, feats)``): code that compares a model with
and without an inference-time intervention takes one and enters it only around the intervened measurements."""


def applied(intervention: Intervention | None) -> AbstractContextManager:
    """The intervention's context, or a no-op context for ``None``."""
    return intervention() if intervention is not None else nullcontext()


@dataclass
class Direction:
    """A direction in the residual stream, with where it came from (``fingerprint`` of the model it was computed on)."""

    vector: Float[Tensor, " d_model"] | Float[Tensor, "k d_model"]  # one direction, or k spanning a subspace
    fingerprint: str | None = None
    layer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable (saved in the file's header)

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("Direction", shape=tuple(self.vector.shape), norm=float(self.vector.float().norm()),
                          layer=self.layer, fingerprint=(self.fingerprint or "")[:12] or None, meta=self.meta)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a safetensors file, whole or not at all; an existing file is replaced only with ``overwrite`` and
        only if it is a saved :class:`Direction`."""
        check_out_file(path, overwrite, is_mine=lambda p: tensors_header(p, "mechun.Direction") is not None,
                       option="path")
        header = {"fingerprint": self.fingerprint, "layer": self.layer, "meta": self.meta}
        return save_tensors(path, {"vector": self.vector}, "mechun.Direction", header)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        t, h = load_tensors(path, "mechun.Direction", "Direction")
        return cls(t["vector"], h["fingerprint"], h["layer"], h["meta"])


DirectionLike = Tensor | Direction
"""A :class:`Direction` or a bare ``d_model`` / ``k d_model`` tensor. Any tensor is accepted here and checked
against the model at run time, so that a wrong shape gets an error that names the model's ``d_model``."""

Positions = int | slice | Sequence[int] | Bool[Tensor, "batch pos"] | None
"""Where an intervention applies: every token (``None``), an index / indices / slice of the padded sequence, or a
boolean mask over the padded tokens (at least as long as the sequence run)."""


def _validate(model: Model, direction: DirectionLike, what: str) -> Shaped[Tensor, "*k d_model"]:
    if isinstance(direction, Direction):
        check_same_model(model, direction.fingerprint, what)
        vec = direction.vector
    elif isinstance(direction, Tensor):
        vec = direction
    else:
        raise TypeError(f"{what} must be a torch.Tensor or mechun.Direction, got {type(direction).__name__}")
    vec = vec.detach()
    if vec.ndim not in (1, 2) or vec.shape[-1] != d_model(model):
        raise MechunError(
            f"{what} has shape {tuple(vec.shape)} but the model has d_model={d_model(model)}; "
            "was it computed on another model?"
        )
    if not torch.isfinite(vec).all():
        raise MechunError(f"{what} contains NaN or inf; recompute it (check for empty or degenerate inputs)")
    norms = vec.float().reshape(-1, vec.shape[-1]).norm(dim=-1)
    if bool((norms == 0).any()):
        raise MechunError(f"{what} is the zero vector; there is nothing to project out or add")
    return vec


def _per_layer(model: Model, directions: DirectionLike | Mapping[int, DirectionLike],
               layers: Sequence[int] | int | None) -> dict[int, Tensor]:
    if isinstance(directions, Mapping):
        if layers is not None:
            raise MechunError("pass per-layer directions as a dict *or* layers=, not both")
        return {check_layer(model, k): _validate(model, v, f"direction for layer {k}")
                for k, v in directions.items()}
    vec = _validate(model, directions, "direction")
    if layers is None:
        layers = range(n_layers(model))
    elif isinstance(layers, int):
        layers = [layers]
    if len(layers) == 0:
        raise MechunError("layers is empty; pass None for every layer")
    return {check_layer(model, layer): vec for layer in layers}


def _position_selector(positions: Positions, act: Tensor
                       ) -> slice | tuple[slice, int | slice | list[int]] | Bool[Tensor, "batch seq"]:
    if positions is None:
        return slice(None)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape[0] != act.shape[0] or positions.shape[1] < act.shape[1]:
            raise MechunError(f"positions mask has shape {tuple(positions.shape)}, activation {tuple(act.shape[:2])}")
        return positions[:, : act.shape[1]].to(act.device)
    if isinstance(positions, int | slice):
        return (slice(None), positions)
    if isinstance(positions, Sequence):
        return (slice(None), list(positions))
    raise MechunError(f"positions must be None, an int, a list of ints, a slice or a bool mask; got {positions!r}")


def _basis(vec: Shaped[Tensor, "*k d_model"]) -> Float[Tensor, "r d_model"]:
    """Orthonormal rows spanning the direction(s), in float32."""
    v = vec.float().reshape(-1, vec.shape[-1])
    if v.shape[0] == 1:
        return v / v.norm()
    q, r = torch.linalg.qr(v.T)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q.T[keep]


def ablate(act: Float[Tensor, "*batch d_model"], basis: Float[Tensor, "k d_model"],
           ) -> Float[Tensor, "*batch d_model"]:
    """``act`` (any leading axes, or a single vector) with its component in the span of the orthonormal rows of
    ``basis`` removed; one direction is a ``1 d_model`` basis. Computed in ``act``'s dtype and on its device."""
    b = basis.to(device=act.device, dtype=act.dtype)
    return act - (act @ b.T) @ b


@contextmanager
def project_out(
    model: Model,
    directions: DirectionLike | Mapping[int, DirectionLike],
    layers: Sequence[int] | int | None = None,
    positions: Positions = None,
    hook: HookKind = "resid_post",
) -> Iterator[None]:
    """Within the block, remove ``directions`` (one vector, ``k d_model`` vectors, or ``{layer: vector}``) from
    the residual stream (``hook``) at ``layers`` and ``positions``."""
    per_layer = {layer: _basis(v) for layer, v in _per_layer(model, directions, layers).items()}

    def make(basis: Tensor):
        def fn(act: Tensor) -> Tensor:
            sel = _position_selector(positions, act)
            out = act.clone()
            out[sel] = ablate(act[sel], basis)
            return out
        return fn

    with hooks(model, [(hook_name(model, hook, layer), make(b)) for layer, b in per_layer.items()]):
        yield


@contextmanager
def add_direction(
    model: Model,
    direction: DirectionLike | Mapping[int, DirectionLike],
    coeff: float = 1.0,
    layers: Sequence[int] | int | None = None,
    positions: Positions = None,
    hook: HookKind = "resid_post",
) -> Iterator[None]:
    """Within the block, add ``coeff * direction`` to the residual stream at ``layers`` and ``positions``."""
    if not isinstance(coeff, int | float) or not torch.isfinite(torch.tensor(float(coeff))):
        raise MechunError(f"coeff must be a finite number, got {coeff!r}")
    per_layer = _per_layer(model, direction, layers)
    for layer, v in per_layer.items():
        if v.ndim != 1:
            raise MechunError(f"add_direction takes one vector per layer; layer {layer} got shape {tuple(v.shape)}")

    def make(vec: Tensor):
        def fn(act: Tensor) -> Tensor:
            sel = _position_selector(positions, act)
            out = act.clone()
            out[sel] = act[sel] + coeff * vec.to(device=act.device, dtype=act.dtype)
            return out
        return fn

    with hooks(model, [(hook_name(model, hook, layer), make(v)) for layer, v in per_layer.items()]):
        yield
