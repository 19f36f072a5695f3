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
from contextlib import ExitStack, contextmanager
from typing import Literal, get_args

from torch import Tensor, nn

from mechun.models import Model, bare_forward_view, foreign_hook_count, hook_point, layer_output

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

    modules = {id(m): m for m in itertools.chain(model.modules(), bare_forward_view(model)[0].modules())}
    return foreign_hook_count(modules.values(), backward=True)


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
    bad = [kind for _, kind, _ in layer_hooks if kind not in FAST_KINDS]
    if bad:
        raise ValueError(f"bare_layer_hooks supports {FAST_KINDS}, not {bad[0]!r}")
    with ExitStack() as stack:
        for layer, kind, fn in layer_hooks:
            stack.enter_context(site_hook(layers[layer], "out" if kind == "resid_post" else "in", fn))
        yield bare


@contextmanager
def site_hook(module: nn.Module, side: Literal["in", "out"], fn: HookFn) -> Iterator[None]:
    """``fn`` on a plain torch module's input (``side="in"``: its first argument or ``hidden_states``) or output
    (``"out"``: the tensor, or a tuple's first item) for the scope of the ``with``; it returns a replacement or
    ``None`` (keep). The hooks of the bare view (:func:`mechun.models.bare_forward_view`) are made with it."""
    if side == "out":
        def hook(mod, args, output):
            new = fn(layer_output(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handle = module.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
