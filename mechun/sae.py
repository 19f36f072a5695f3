"""SAE-based unlearning: intervene on sparse-autoencoder features, negatively (Farrell, Lau & Conmy 2024).

A sparse autoencoder (sae-lens) rewrites the residual stream at one hook as a sparse sum of features. To unlearn a
domain, pick features that fire on forget text but (almost) never on retain text, and wherever such a feature is
active, *clamp* it to a negative value ``-m`` (or multiply it by ``-k``, or zero it). The SAE's reconstruction error
is kept: the hook replaces ``x`` by ``decode(f') + (x - decode(f))``, so an edit changes only the features it
names. Zero-ablation tends not to unlearn; negative clamping does, at a cost in side effects when many features are
used. SAEBench's selection rule: drop features whose activation frequency on retain text exceeds a threshold, rank
the rest by frequency on forget text, take the top N.

This module trains SAEs offline on a (bridge) model with sae-lens, loads them from disk (or the hub for online
users), computes feature statistics, selects features, and provides the intervention as a context manager.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechun.cache import cache_residuals
from mechun.errors import MechunError
from mechun.hooks import hooks
from mechun.models import check_layer, d_model, hook_name, model_device

MODES = ("clamp", "scale", "zero")


def _hook_of(sae: Any) -> str:
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else getattr(sae.cfg, "hook_name", None)
    if not name:
        raise MechunError("this SAE does not record its hook name; pass hook= explicitly")
    return name


def train_sae(
    model: Any,
    texts: Sequence[str],
    layer: int,
    architecture: str = "standard",
    d_sae: int = 256,
    k: int = 16,
    l1_coefficient: float = 1.0,
    training_tokens: int = 60_000,
    context_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> Any:
    """Train an SAE on ``blocks.{layer}.hook_resid_post`` with sae-lens, offline (texts are packed into windows of
    ``context_size`` tokens, each starting with BOS). Returns the sae-lens training SAE (encode/decode work)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    layer = check_layer(model, layer)
    if architecture == "standard":
        sae_cfg = StandardTrainingSAEConfig(d_in=d_model(model), d_sae=d_sae, l1_coefficient=l1_coefficient)
    elif architecture == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=d_model(model), d_sae=d_sae, k=k)
    else:
        raise MechunError(f"architecture must be 'standard' or 'topk', got {architecture!r}")
    tok = model.tokenizer
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    chunks = [[bos] + ids[i:i + context_size - 1] for i in range(0, len(ids) - context_size, context_size - 1)]
    if len(chunks) < 8:
        raise MechunError(f"only {len(chunks)} windows of {context_size} tokens; pass more text")
    batch = 512
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=str(getattr(model.cfg, "model_name", "mechun-model")),
        hook_name=hook_name(model, "resid_post", layer), dataset_path="", is_dataset_tokenized=True, streaming=False,
        context_size=context_size, prepend_bos=False, training_tokens=training_tokens,
        train_batch_size_tokens=batch, n_batches_in_buffer=max(8, -(-2 * batch // context_size)),
        store_batch_size_prompts=32, device=str(model_device(model)), seed=seed, lr=lr,
        logger=LoggingConfig(log_to_wandb=False), output_path=None, checkpoint_path=None, n_checkpoints=0,
        save_final_checkpoint=False,
    )
    torch.manual_seed(seed)
    return LanguageModelSAETrainingRunner(cfg, override_model=model,
                                          override_dataset=Dataset.from_dict({"input_ids": chunks})).run()


def save_sae(sae: Any, path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(path)) if hasattr(sae, "save_inference_model") else sae.save_model(str(path))
    return path


def load_sae(path_or_release: str | Path, sae_id: str | None = None, device: str = "cpu") -> Any:
    """A local sae-lens SAE dir, or (online) a sae-lens release + id via ``SAE.from_pretrained``."""
    from sae_lens import SAE

    p = Path(path_or_release)
    if p.is_dir():
        return SAE.load_from_disk(str(p), device=device)
    if sae_id is None:
        raise MechunError(f"{path_or_release} is not a local SAE dir; for the hub pass a release and sae_id")
    return SAE.from_pretrained(str(path_or_release), sae_id, device=device)


@dataclass
class FeatureStats:
    frequency: Tensor  # d_sae: fraction of tokens where the feature is active
    mean_activation: Tensor  # d_sae: mean activation where active
    n_tokens: int


@torch.inference_mode()
def feature_stats(model: Any, sae: Any, prompts: Sequence[str], hook: str | None = None) -> FeatureStats:
    """Activation frequency and mean activation of every feature over the prompts' tokens (BOS excluded)."""
    hook = hook or _hook_of(sae)
    layer = int(hook.split(".")[1])
    cache = cache_residuals(model, list(prompts), layers=[layer], positions="all", progress=False)
    mask = cache.mask.clone()
    mask[:, 0] = False
    acts = sae.encode(cache[layer][mask].to(sae.W_dec.device, sae.W_dec.dtype))
    active = acts > 0
    freq = active.float().mean(0)
    mean = (acts * active).sum(0) / active.sum(0).clamp_min(1)
    return FeatureStats(freq.cpu(), mean.cpu(), int(mask.sum()))


def select_features(forget: FeatureStats, retain: FeatureStats, retain_threshold: float = 0.01,
                    n: int = 10) -> list[int]:
    """SAEBench's rule: features with retain frequency <= threshold, ranked by forget frequency, top ``n``
    (only features that fire on forget text at all)."""
    ok = (retain.frequency <= retain_threshold) & (forget.frequency > 0)
    ranked = torch.argsort(torch.where(ok, forget.frequency, torch.tensor(-1.0)), descending=True)
    return [int(i) for i in ranked[: min(n, int(ok.sum()))]]


def edit_features(acts: Tensor, features: Sequence[int], mode: str, value: float) -> Tensor:
    """The feature edit alone: clamp active features to ``-value``, scale them by ``-value``, or zero them."""
    if mode not in MODES:
        raise MechunError(f"mode must be one of {MODES}, got {mode!r}")
    out = acts.clone()
    idx = torch.tensor(list(features), device=acts.device, dtype=torch.long)
    sel = out[..., idx]
    active = sel > 0
    if mode == "clamp":
        sel = torch.where(active, torch.full_like(sel, -abs(value)), sel)
    elif mode == "scale":
        sel = torch.where(active, -abs(value) * sel, sel)
    else:
        sel = torch.zeros_like(sel)
    out[..., idx] = sel
    return out


@contextmanager
def sae_intervention(model: Any, sae: Any, features: Sequence[int], mode: str = "clamp", value: float = 50.0,
                     hook: str | None = None) -> Iterator[None]:
    """Within the block, the residual stream at the SAE's hook becomes
    ``decode(edit(encode(x))) + (x - decode(encode(x)))``: only the named features change."""
    hook = hook or _hook_of(sae)
    features = list(features)
    if not features:
        raise MechunError("no features selected; loosen the retain threshold or pass feature ids")
    d_sae = sae.W_dec.shape[0]
    if min(features) < 0 or max(features) >= d_sae:
        raise MechunError(f"feature ids must be in 0..{d_sae - 1}")
    if sae.W_dec.shape[1] != d_model(model):
        raise MechunError(f"the SAE has d_in={sae.W_dec.shape[1]} but the model has d_model={d_model(model)}")
    if mode not in MODES:
        raise MechunError(f"mode must be one of {MODES}, got {mode!r}")

    def fn(x: Tensor) -> Tensor:
        xs = x.to(sae.W_dec.dtype)
        f = sae.encode(xs)
        recon = sae.decode(f)
        out = sae.decode(edit_features(f, features, mode, value)) + (xs - recon)
        return out.to(x.dtype)

    with hooks(model, [(hook, fn)]):
        yield


def top_activating(model: Any, sae: Any, prompts: Sequence[str], feature: int, k: int = 5,
                   hook: str | None = None) -> list[tuple[float, str, str]]:
    """Feature card: the ``k`` (activation, prompt, token) with the highest activation of ``feature``."""
    hook = hook or _hook_of(sae)
    layer = int(hook.split(".")[1])
    cache = cache_residuals(model, list(prompts), layers=[layer], positions="all", progress=False)
    mask = cache.mask.clone()
    mask[:, 0] = False
    idx = mask.nonzero()
    with torch.inference_mode():
        acts = sae.encode(cache[layer][mask].to(sae.W_dec.device, sae.W_dec.dtype))[:, feature].cpu()
    from mechun.models import tokenize

    ids, _ = tokenize(model, list(prompts))
    out = []
    for j in torch.argsort(acts, descending=True)[:k].tolist():
        b, p = idx[j].tolist()
        out.append((float(acts[j]), prompts[b], model.tokenizer.convert_ids_to_tokens(int(ids[b, p]))))
    return out
