"""Loading, saving and fingerprinting models: the one module that knows TransformerLens' loading API.

mechun works on TransformerLens' ``TransformerBridge``: a wrapper that keeps the Hugging Face model's own forward
(so activations match ``transformers`` to float precision) and exposes TransformerLens hook points with the usual
vocabulary (``blocks.{l}.hook_resid_post``, ``blocks.{l}.hook_mlp_out`` ...). A real checkpoint from the hub
(``gpt2``, ``google/gemma-2-2b``, ``HuggingFaceH4/zephyr-7b-beta``) and a local ``save_pretrained`` directory -- such
as the model organism mechun trains itself -- go through the same path, :func:`load_model`.

Everything else in mechun asks this module for hook points (:func:`hook_point`), shapes (:func:`n_layers`,
:func:`d_model`), tokenisation (:func:`tokenize`) and identity (:func:`model_fingerprint`), so that a move to another
TransformerLens API stays local to this file.

The fingerprint is a hash of the architecture and of every weight. Artifacts (caches, directions) record it, and
functions that take an artifact and a model refuse a pair whose fingerprints differ: a junk direction computed on
one model says nothing about another.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import weakref
from collections.abc import Iterable
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import torch
from jaxtyping import Int
from torch import Tensor, nn

from mechun.errors import CheckpointError, DeviceError, MechunError, ModelMismatchError, VocabularyError
from mechun.progress import quiet_dependencies

#: Architectures whose loading (and hook-point equivalence with Hugging Face hidden states) the tests check.
TESTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM")

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PretrainedConfig

    Model: TypeAlias = TransformerBridge
else:  # runtime: no import cost, and annotations stay checkable by beartype under pytest
    Model = Any
    PretrainedConfig = Any
"""The model type every mechun function takes: TransformerLens' ``TransformerBridge`` (see :func:`load_model`)."""

#: The hook kinds mechun names by a short name (``hook_name(model, "resid_post", 3)``); the one source of truth.
HookKind = Literal["resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out"]
HOOK_KINDS: tuple[HookKind, ...] = get_args(HookKind)

# Short names for the hook points mechun uses most; any exact hook name of the bridge is accepted too.
_SHORT_HOOKS: dict[HookKind, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep) and name.count("/") != 1


def resolve_source(path_or_name: str | os.PathLike) -> str:
    """A local checkpoint dir (validated) or a hub name, passed through for online users."""
    s = str(path_or_name)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MechunError(f"{s} is a file; pass the checkpoint *directory* written by save_pretrained")
        if (p / "config.json").is_file():
            try:
                json.loads((p / "config.json").read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{p / 'config.json'} is not valid JSON ({e}); the checkpoint is damaged: "
                                      "re-save or re-download it") from e
        else:
            raise MechunError(
                f"{s} has no config.json: it is not a Hugging Face checkpoint dir. Train one with "
                "`mechun organism train --out DIR` or save one with `mechun.save_model(model, DIR)`."
            )
        return str(p.resolve())
    if looks_like_path(s):
        raise FileNotFoundError(f"no checkpoint directory at {s}; check the path (a hub name has the form org/name)")
    return s


def load_model(
    path_or_name: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, int | str | torch.device] | None = None,
) -> Model:
    """Load a local Hugging Face checkpoint dir or a hub name as a TransformerLens ``TransformerBridge``.

    ``device_map`` (e.g. ``"auto"``) spreads a large model over several GPUs through ``transformers``; it excludes
    ``device``. The returned model carries its tokenizer (``model.tokenizer``) and is in eval mode. Weights are exactly the
    checkpoint's (no LayerNorm folding), so ``blocks.{l}.hook_resid_post`` equals Hugging Face's
    ``hidden_states[l + 1]``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(path_or_name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    if device_map is not None and device is not None:
        raise MechunError("pass either device or device_map, not both")
    if device_map is None:
        device = check_device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    try:
        with quiet_dependencies():  # no "Loading weights" bar per checkpoint
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf_model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager",
                                                                  device_map=device_map, output_loading_info=True)
    except Exception as e:  # a hub name offline; or a local dir whose config, tokenizer or weights are damaged
        if not Path(source).exists():
            if isinstance(e, OSError):
                raise MechunError(f"could not load {source!r}: {' '.join(str(e).split())}. Offline, pass a local "
                                  "checkpoint dir; online, check the hub name.") from e
            raise
        raise CheckpointError(f"{source}: the checkpoint cannot be read ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}); it is damaged: re-save or re-download it") from e
    check_loaded(source, info, hf_model, tokenizer)
    if device_map is None:
        hf_model.to(device)
    bridge = _bridge(hf_model, tokenizer, source, device, dtype)
    _SOURCES[bridge] = source
    return bridge


def _bridge(hf: nn.Module, tokenizer: Any, source: str, device: torch.device | None, dtype: torch.dtype) -> Model:
    """The bridge over a loaded HF model: right padding (pad = eos where the tokenizer has none; mechun always
    passes an attention mask), fused activations, eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    fuse_activations(hf)
    with quiet_dependencies():
        bridge = TransformerBridge.boot_transformers(source, hf_model=hf, tokenizer=tokenizer, device=device,
                                                     dtype=dtype)
    bridge.eval()
    return bridge


def wrap_model(hf: nn.Module, tokenizer: Any) -> Model:
    """A bridge over a Hugging Face causal LM already in memory -- one built from a config (random weights, for a
    benchmark), or loaded with options :func:`load_model` does not offer -- as :func:`load_model` makes it from a
    checkpoint: the same hook points, fused activations, eval mode. The model must use eager attention (mechun's
    hooks read and patch attention internals) and keep its weights on one device."""
    if getattr(hf.config, "_attn_implementation", "eager") != "eager":
        raise MechunError(f"the model uses {hf.config._attn_implementation!r} attention; build or load it with "
                          "attn_implementation='eager'")
    devices = {p.device for p in hf.parameters()}
    if len(devices) != 1:
        raise MechunError(f"the model's weights are on {len(devices)} devices; wrap_model takes a model on one "
                          "device (use load_model(..., device_map=...) for a spread model)")
    for name, p in hf.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"weight {name!r} holds NaN or inf values; the model cannot give meaningful outputs")
    _check_tokenizer("the tokenizer", tokenizer, int(hf.get_input_embeddings().weight.shape[0]))
    import tempfile

    from transformers import AutoTokenizer

    # TransformerLens re-reads the tokenizer from its files when it boots a bridge: give it a dir that has them
    with tempfile.TemporaryDirectory(prefix="mechun-wrap-") as tmp:
        with quiet_dependencies():
            tokenizer.save_pretrained(tmp)
            hf.config.save_pretrained(tmp)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        return _bridge(hf.eval(), tokenizer, tmp, devices.pop(), next(hf.parameters()).dtype)


_SOURCES: weakref.WeakKeyDictionary[Model, str] = weakref.WeakKeyDictionary()


def fuse_activations(hf_model: nn.Module) -> int:
    """Replace ``transformers``' ``NewGELUActivation`` (GPT-2's ``gelu_new``: tanh-approximate GELU written as
    five elementwise ops) with ``PytorchGELUTanh`` -- the same function as one fused kernel, three times faster
    and within 3e-7 of it (float rounding). GELU was a quarter of an organism forward. Returns how many modules
    were replaced; no weight changes, and no hook point sits on the activation module itself."""
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    swaps = [(parent, name) for parent in hf_model.modules() for name, child in parent.named_children()
             if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, PytorchGELUTanh())
    return len(swaps)


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it; else a :class:`DeviceError` saying what to pass instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                              "False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r}: MPS is not available on this machine; use --device cpu")
    return dev


def check_loaded(source: str, info: dict[str, Any], hf: nn.Module, tokenizer: Any) -> None:
    """Refuse a checkpoint that would load wrongly: ``transformers`` fills missing weights with random values and
    drops unexpected ones, both silently; NaN/inf weights give chance-level answers; a tokenizer that cannot encode
    its own words turns every prompt into unknown tokens."""
    where = Path(source) if Path(source).exists() else source
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k[0] if isinstance(k, tuple) else k for k in info.get(kind) or []]
        if keys:
            raise CheckpointError(f"{where}: the weights file has {len(keys)} {kind.replace('_', ' ')} "
                                  f"(e.g. {keys[0]!r}); the checkpoint is damaged or of another architecture: "
                                  "re-save it (mechun.save_model) or re-download it")
    for name, p in hf.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{where}: weight {name!r} holds NaN or inf values; the model cannot give "
                                  "meaningful outputs: use an earlier checkpoint (training diverged?)")
    _check_tokenizer(where, tokenizer, int(hf.get_input_embeddings().weight.shape[0]))


def _check_tokenizer(where: Path | str, tokenizer: Any, n_embeddings: int) -> None:
    """The tokenizer must cover the model's embeddings (at least half of them: models pad their embedding matrix)
    and encode a few ordinary words of its own vocabulary to known tokens."""
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    first = tokenizer.convert_ids_to_tokens(list(range(min(n, 4096))))  # the lowest ids: no sort of a 256k vocab
    words = [i for i, t in enumerate(first) if i not in special and t and t.lstrip("Ġ▁ ").isalnum()][:8]
    text = " ".join(tokenizer.decode([i]).strip() for i in words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    unk = tokenizer.unk_token_id
    if n < max(8, n_embeddings // 2) or not ids or (unk is not None and unk in ids):
        raise CheckpointError(f"{where}: the tokenizer cannot be right: it knows {n} tokens for a model of "
                              f"{n_embeddings} embeddings and encodes {text[:30]!r} to {len(ids)} tokens; its files "
                              "(tokenizer.json, tokenizer_config.json) are missing or damaged: copy them back from "
                              "the original checkpoint")


def model_source(model: Model) -> str | None:
    """The path or hub name a model was loaded from, if it came through :func:`load_model`."""
    return _SOURCES.get(model)


def hf_model(model: Model) -> nn.Module:
    """The Hugging Face model underneath a bridge (its module tree is wrapped by the bridge's components)."""
    return model.original_model


def hf_config(model: Model) -> PretrainedConfig:
    return hf_model(model).config


def n_layers(model: Model) -> int:
    return int(model.cfg.n_layers)


def d_model(model: Model) -> int:
    return int(model.cfg.d_model)


def model_device(model: Model) -> torch.device:
    return next(model.parameters()).device


def _clean_state_dict(model: Model) -> dict[str, Tensor]:
    """The Hugging Face state dict, keys as ``save_pretrained`` writes them, without bridge-only tensors."""
    hf = hf_model(model)
    out: dict[str, Tensor] = {}
    for key, value in hf.state_dict().items():
        clean = key.replace("_original_component.", "")
        out.setdefault(clean, value)
    return out


_KEYS_CACHE: weakref.WeakKeyDictionary[Model, list[str]] = weakref.WeakKeyDictionary()


def _hf_state_keys(model: Model) -> list[str]:
    """Keys of an unwrapped Hugging Face model of the same config (built once, on the meta device)."""
    from transformers import AutoModelForCausalLM

    if model not in _KEYS_CACHE:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(hf_config(model))
        _KEYS_CACHE[model] = list(fresh.state_dict().keys())
    return _KEYS_CACHE[model]


def hf_state_dict(model: Model) -> dict[str, Tensor]:
    """Exactly the tensors a Hugging Face checkpoint of this model holds, under their Hugging Face names."""
    wrapped = _clean_state_dict(model)
    keys = _hf_state_keys(model)
    missing = [k for k in keys if k not in wrapped]
    if missing:
        raise MechunError(f"cannot map the bridge back to Hugging Face weights; missing {missing[:5]}")
    return {k: wrapped[k] for k in keys}


def save_model(model: Model, out_dir: str | os.PathLike, extra_files: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Save a bridge as a local Hugging Face checkpoint dir (config, safetensors, tokenizer) that
    :func:`load_model` reads back. Written whole or not at all (:func:`mechun.io.atomic_dir`); ``overwrite``
    replaces an earlier mechun output at ``out_dir``, never anything else. ``extra_files`` maps file names to
    JSON-serialisable objects written beside the weights."""
    from transformers import AutoModelForCausalLM

    from mechun.io import atomic_dir

    state = hf_state_dict(model)
    bad = next((k for k, v in state.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"refusing to save {out_dir}: weight {bad!r} holds NaN or inf values (training "
                              "diverged? lower the learning rate or the steering coefficient)")
    with atomic_dir(out_dir, "checkpoint", overwrite, need_bytes=checkpoint_bytes(model)) as tmp:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(hf_config(model))
        fresh.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True, assign=True)
        with quiet_dependencies():  # no "Writing model shards" bar per checkpoint
            fresh.save_pretrained(tmp)
            model.tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return Path(out_dir)


def checkpoint_bytes(model: Model) -> int:
    """About what :func:`save_model` writes: every weight once, plus a little for config and tokenizer."""
    return sum(p.numel() * p.element_size() for p in hf_model(model).parameters()) + 2_000_000


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------------
# model -> (the weights' (name, data pointer, version) when hashed, the fingerprint)
_FP_CACHE: weakref.WeakKeyDictionary[Model, tuple[tuple[tuple[str, int, int], ...], str]] = (
    weakref.WeakKeyDictionary())


_STATE_CACHE: weakref.WeakKeyDictionary[Model, dict[str, Tensor]] = weakref.WeakKeyDictionary()


def model_fingerprint(model: Model) -> str:
    """A short hash of the architecture and every weight.

    Cheap to call repeatedly: the hash is recomputed only after a weight tensor changes in place (optimiser steps,
    ``load_state_dict``, ``copy_``), detected through the tensors' version counters. Replacing a parameter *object*
    is not seen; call :func:`forget_fingerprint` after doing that.
    """
    if model not in _STATE_CACHE:
        _STATE_CACHE[model] = hf_state_dict(model)
    state = _STATE_CACHE[model]
    versions = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    cached = _FP_CACHE.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    cfg = hf_config(model)
    h = hashlib.blake2b(digest_size=12)
    arch = {"architectures": cfg.architectures, "n_layers": n_layers(model), "d_model": d_model(model)}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    fp = h.hexdigest()
    _FP_CACHE[model] = (versions, fp)
    return fp


def forget_fingerprint(model: Model) -> None:
    _STATE_CACHE.pop(model, None)
    _FP_CACHE.pop(model, None)


def check_same_model(model: Model, fingerprint: str | None, what: str) -> None:
    """Refuse an artifact (cache, direction) that was computed on another model."""
    if fingerprint is None:
        return
    mine = model_fingerprint(model)
    if fingerprint != mine:
        raise ModelMismatchError(
            f"{what} was computed on model {fingerprint} but this model is {mine}; recompute it on this model "
            "(or load the model it came from)."
        )


# ---------------------------------------------------------------------------------------------------------------
# Hook points and layers
# ---------------------------------------------------------------------------------------------------------------
def check_layer(model: Model, layer: int) -> int:
    """``layer`` as an index in ``0..n_layers-1`` (negative counts from the end); a float, bool or string is refused,
    never rounded (``2.5`` is not layer 2)."""
    n = n_layers(model)
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise MechunError(f"layer must be an integer, got {layer!r}")
    layer = layer.__index__()
    if not -n <= layer < n:
        raise MechunError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    return layer % n


def hook_name(model: Model, kind: HookKind | str, layer: int) -> str:
    """``hook_name(model, "resid_post", 3) == "blocks.3.hook_resid_post"``, with the layer checked.

    ``kind`` is a :data:`HookKind`; any other string (a user's, from the CLI or a config) is a :class:`MechunError`
    naming the valid kinds."""
    if kind not in _SHORT_HOOKS:
        raise MechunError(f"unknown hook kind {kind!r}; use one of {list(HOOK_KINDS)}")
    return _SHORT_HOOKS[kind].format(layer=check_layer(model, layer))


def hook_point(model: Model, name: str) -> nn.Module:
    """The TransformerLens hook point (an ``nn.Module``) for a hook name, aliases included."""
    point = model.get_hook_point(name) if isinstance(name, str) else None
    if point is None:
        known = list(model.hook_dict) + [
            v.format(layer=i) for i in range(n_layers(model)) for v in _SHORT_HOOKS.values()
        ]
        guess = get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else "; see model.hook_dict for the names"
        parts = str(name).split(".")
        if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
            check_layer(model, int(parts[1]))
        raise MechunError(f"unknown hook {name!r}{hint}")
    return point


def hook_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------
def tokenize(model: Model, prompts: list[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded token ids and attention mask, with the tokenizer's own special tokens: a BOS first for
    Llama/Gemma and for the organism (its word-level tokenizer prepends ``<bos>``, then one token per word), none
    for GPT-2.

    Right padding keeps absolute and rotary positions of real tokens unchanged; mechun always passes the mask and
    reads "last" positions from it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise MechunError("empty prompt list: pass at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise MechunError(f"prompt {bad[0]} is empty or not a string: {prompts[bad[0]]!r}")
    tok = model.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(mask.sum(1).min()) == 0:
        raise MechunError("a prompt tokenised to zero tokens")
    if tok.unk_token_id is not None and bool((ids == tok.unk_token_id).any()):
        row = int((ids == tok.unk_token_id).any(1).nonzero()[0, 0])
        bad = [w for w in prompts[row].split() if unknown(tok, w)]
        raise VocabularyError(f"prompt {row} ({prompts[row][:60]!r}) has words the model's vocabulary lacks "
                              f"({', '.join(map(repr, bad[:3])) or 'some'}); they would be read as the unknown "
                              f"token{suggest(tok, bad[0] if bad else '')}")
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and ids.shape[1] > n_ctx:
        row = int(mask.sum(1).argmax())
        raise MechunError(f"prompt {row} is {int(mask[row].sum())} tokens but the model's context is {n_ctx}; "
                          "shorten it")
    return ids, mask


def unknown(tokenizer: Any, word: str) -> bool:
    """Whether ``word`` (as it follows a space) needs the tokenizer's unknown token."""
    unk = tokenizer.unk_token_id
    return unk is not None and unk in tokenizer(" " + word, add_special_tokens=False)["input_ids"]


def suggest(tokenizer: Any, word: str) -> str:
    """``"; did you mean 'x'?"`` with the vocabulary's nearest spelling of ``word``, or ``""``."""
    if not word:
        return ""
    vocab = [t.lstrip("Ġ▁") for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens]
    same = [t for t in vocab if t.lower() == word.lower()]
    guess = same or (get_close_matches(word, vocab, n=1, cutoff=0.75) if len(vocab) <= 200_000 else [])
    return f"; did you mean {guess[0]!r}?" if guess else ""


def word_ids(model: Model, word: str, what: str = "word", at_start: bool = False) -> list[int]:
    """The token ids of ``word`` as it appears in a prompt (after a space unless ``at_start``), without special
    tokens. A word the tokenizer can only encode with its unknown token is a :class:`VocabularyError` naming it
    (``what``: "answer", "subject", ...) and the vocabulary's nearest spelling -- never a silent ``<unk>``."""
    if not isinstance(word, str) or not word.strip():
        raise MechunError(f"{what} must be a non-empty string, got {word!r}")
    tok = model.tokenizer
    ids = tok(word if at_start else " " + word, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        bad = [w for w in word.split() if unknown(tok, w)] or [word]
        raise VocabularyError(f"{what} {bad[0]!r} is not in the model's vocabulary (it would be read as "
                              f"{tok.unk_token}){suggest(tok, bad[0])}")
    if not ids:
        raise MechunError(f"{what} {word!r} tokenises to nothing")
    return ids


def check_token_ids(model: Model, ids: Tensor) -> None:
    """Token ids given directly must index the model's vocabulary."""
    vocab = int(model.cfg.d_vocab)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise MechunError(f"token ids must be in 0..{vocab - 1} (the model's vocabulary); got "
                          f"{int(ids.min())}..{int(ids.max())}")


# ---------------------------------------------------------------------------------------------------------------
# The bare Hugging Face forward (fast path for caching)
# ---------------------------------------------------------------------------------------------------------------
_BARE: weakref.WeakKeyDictionary[Model, tuple[nn.Module, list[nn.Module]]] = weakref.WeakKeyDictionary()


def _is_bridge(module: nn.Module) -> bool:
    return "_original_component" in module._modules


def _unwrap(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A view of ``module`` with every bridge component replaced by the HF module it wraps. Modules whose subtree
    holds no bridge are reused as they are; the others are shallow copies without hooks. Parameters are shared."""
    original = module
    while _is_bridge(module):
        module = module._modules["_original_component"]
    if id(module) in memo:
        return memo[id(module)]
    children = {k: (_unwrap(c, memo) if c is not None else None) for k, c in module._modules.items()}
    if all(children[k] is module._modules[k] for k in children) and not _has_hooks(module):
        out = module
    else:
        out = copy.copy(module)
        out.__dict__ = dict(module.__dict__)
        out._modules = children
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks"):
            if hasattr(module, attr):
                setattr(out, attr, type(getattr(module, attr))())
    memo[id(module)] = out
    memo[id(original)] = out
    return out


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def bare_forward_view(model: Model) -> tuple[nn.Module, list[nn.Module]]:
    """The HF model without the bridge's wrappers (sharing every weight), and its decoder layers in order.

    A forward through it costs what a plain ``transformers`` forward costs; hooks on the bridge's modules (hook
    points included) do not fire in it, so callers use it only when there are none (:func:`foreign_hooks_present`).
    The view is rebuilt whenever the model's module tree or a module's train/eval flag has changed since it was made
    (a module swapped in, ``model.train()``), so it never runs a stale copy.
    """
    state = tuple((id(m), m.training) for m in hf_model(model).modules())
    if model not in _BARE or _BARE_STATE.get(model) != state:
        memo: dict[int, nn.Module] = {}
        bare = _unwrap(hf_model(model), memo)
        layers = [memo[id(block._modules["_original_component"])] for block in model.blocks]
        shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
        if any(p.untyped_storage().data_ptr() not in shared for p in bare.parameters()):
            raise MechunError("the unwrapped model does not share weights with the bridge; use the bridge path")
        _BARE[model] = (bare, layers)
        _BARE_MEMO[model] = memo
        _BARE_STATE[model] = state
    return _BARE[model]


_BARE_STATE: weakref.WeakKeyDictionary[Model, tuple[tuple[int, bool], ...]] = weakref.WeakKeyDictionary()
_BARE_MEMO: weakref.WeakKeyDictionary[Model, dict[int, nn.Module]] = weakref.WeakKeyDictionary()


def bare_counterpart(model: Model, component: nn.Module) -> nn.Module:
    """The module of the bare view (:func:`bare_forward_view`) that a bridge component (or an HF module inside the
    bridge) stands for."""
    bare_forward_view(model)
    while _is_bridge(component):
        component = component._modules["_original_component"]
    return _BARE_MEMO[model].get(id(component), component)


def bare_module(model: Model, name: str) -> tuple[nn.Module, Literal["in", "out"]]:
    """The bare-view module whose input (``"in"``: its first argument) or output (``"out"``: the first item of a
    tuple) is the tensor the bridge's hook point ``name`` sees -- e.g. ``blocks.3.hook_attn_out`` is the output of
    GPT-2's ``attn`` but of Gemma-2's ``post_attention_layernorm``, ``blocks.3.attn.hook_z`` the input of
    ``o_proj`` (heads flattened)."""
    point = hook_point(model, name)
    path = next((n for n, m in model.named_modules() if m is point), None)
    parent, _, leaf = (path or "").rpartition(".")
    if leaf not in ("hook_in", "hook_out"):
        raise MechunError(f"hook {name!r} is not the input or output of a module of the Hugging Face model")
    return bare_counterpart(model, model.get_submodule(parent)), "in" if leaf == "hook_in" else "out"


def foreign_hook_count(modules: Iterable[nn.Module], backward: bool = False) -> int:
    """How many forward (and with ``backward`` backward) hooks on ``modules`` are not the libraries' own (the
    bridge's internal wiring, ``transformers``' output capturing)."""
    n = 0
    for m in modules:
        tables = [m._forward_hooks, m._forward_pre_hooks]
        if backward:
            tables += [m._backward_hooks, getattr(m, "_backward_pre_hooks", {})]
        n += sum(not _library_internal(fn) for table in tables for fn in table.values())
    return n


def foreign_hooks_present(model: Model) -> bool:
    """Whether any module of the bridge -- a hook point or any other -- has a forward hook that is not the
    libraries' own. Paths through the bare view (:func:`bare_forward_view`), where such hooks would not fire, are
    taken only when there are none."""
    return foreign_hook_count(model.modules()) > 0


def _library_internal(fn: object) -> bool:
    """A hook the libraries install on themselves and keep: TransformerLens' bridge wires capture hooks on its first
    forward, ``transformers`` installs output-capturing hooks the first time hidden states or attentions are
    requested (e.g. by ``run_with_cache``). Hooks registered through hook points (mechun's, the user's, TL's
    ``run_with_hooks``) come from other modules and are counted."""
    return (getattr(fn, "__module__", None) or "").startswith(("transformer_lens.model_bridge", "transformers."))


def layer_output(output: Tensor | tuple[object, ...]) -> Tensor:
    """The hidden states of a decoder layer's output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, tuple) else output
