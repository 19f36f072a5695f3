"""Scoped forward hooks on TransformerLens hook points.

Hooks are global state on the model. :func:`hooks` registers plain torch forward hooks on the bridge's hook points
(``blocks.{l}.hook_resid_post`` ...) and removes exactly the handles it created in ``finally``, so an exception in
the body, in a hook, or halfway through registration never leaves a hook behind, and nested contexts compose. A
hook function takes the activation and returns a replacement or ``None`` (keep it).

Plain torch hooks on the hook-point modules cost less per forward than ``model.hooks()`` (which rebuilds an alias
map on every entry); they fire in every forward of the bridge, including TransformerLens' own ``run_with_cache``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

from torch import Tensor, nn

from mechun.models import Model, _library_internal, bare_forward_view, hook_point, layer_output

HookFn = Callable[[Tensor], Tensor | None]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once everything needed has been read."""


def _adapt(fn: HookFn):
    def torch_hook(module, args, output):
        return fn(output)

    return torch_hook


@contextmanager
def hooks(model: Model, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """``with hooks(model, [("blocks.2.hook_resid_post", fn)]): model(tokens)``."""
    handles = []
    try:
        for name, fn in fwd_hooks:
            handles.append(hook_point(model, name).register_forward_hook(_adapt(fn)))
        yield
    finally:
        for h in reversed(handles):
            h.remove()


def count_hooks(model: Model) -> int:
    """Number of torch hooks registered anywhere in the model or its unwrapped HF view (for leak checks): mechun's,
    the user's and TransformerLens hook-point hooks; the bridge's own internal hooks, which it adds on its first
    forward and keeps, and ``transformers``' output-capturing hooks are not counted (they are not a leak)."""
    import itertools

    seen, n = set(), 0
    for m in itertools.chain(model.modules(), bare_forward_view(model)[0].modules()):
        if id(m) in seen:
            continue
        seen.add(id(m))
        for table in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, getattr(m, "_backward_pre_hooks", {})):
            n += sum(not _library_internal(fn) for fn in table.values())
    return n


#: The hook kinds (a subset of :data:`mechun.models.HookKind`) the caching fast path can hook on the unwrapped HF
#: decoder layers: a layer's input and its output.
FastKind = Literal["resid_pre", "resid_post"]
FAST_KINDS: tuple[FastKind, ...] = get_args(FastKind)


@contextmanager
def bare_layer_hooks(model: Model, layer_hooks: Sequence[tuple[int, FastKind, HookFn]]) -> Iterator[nn.Module]:
    """Hooks on the decoder layers of the bridge's unwrapped HF model; yields that model to run forwards on.

    Only ``resid_pre`` (a layer's input) and ``resid_post`` (its output) are supported: they are the same
    tensors as ``blocks.{l}.hook_resid_pre/post`` in every architecture. Used by the caching fast path.
    """
    bare, layers = bare_forward_view(model)
    handles = []

    def post(fn):
        def hook(module, args, output):
            new = fn(layer_output(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def pre(fn):
        def hook(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return hook

    try:
        for layer, kind, fn in layer_hooks:
            if kind == "resid_post":
                handles.append(layers[layer].register_forward_hook(post(fn)))
            elif kind == "resid_pre":
                handles.append(layers[layer].register_forward_pre_hook(pre(fn), with_kwargs=True))
            else:
                raise ValueError(f"bare_layer_hooks supports {FAST_KINDS}, not {kind!r}")
        yield bare
    finally:
        for h in reversed(handles):
            h.remove()
