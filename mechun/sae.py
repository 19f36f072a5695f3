"""SAE-based unlearning: intervene on sparse-autoencoder features, negatively (Farrell, Lau & Conmy 2024).

A sparse autoencoder (sae-lens) rewrites the residual stream at one hook as a sparse sum of features. To unlearn a
domain, pick features that fire on forget text but (almost) never on retain text, and wherever such a feature is
active, *clamp* it to a negative value ``-m`` (or multiply it by ``-k``, or zero it). The SAE's reconstruction error
is kept: the hook replaces ``x`` by ``decode(f') + (x - decode(f))``, so an edit changes only the features it
names. Zero-ablation tends not to unlearn; negative clamping does, at a cost in side effects when many features are
used. Selection: drop features that fire too often on retain text, rank the rest by how often they fire on forget
text, take the top N.

The defaults follow SAEBench's unlearning eval (``sae_bench/evals/unlearning``) point by point; each old mechun
behaviour is one argument away.

1. **BOS is not edited.** SAEBench zeroes every feature at position 0 before decoding, so the residual stream there
   passes through unchanged; :func:`sae_intervention` returns position 0 exactly as it came (``skip_bos=False``
   edits it like every other position). In the organism and Llama/Gemma tokenizers position 0 is BOS; with a
   tokenizer that adds none (GPT-2) it is the first real token, skipped all the same, as SAEBench would.
2. **Strict threshold.** A feature is kept only if its retain frequency is *below* the threshold; SAEBench drops
   ``retain >= threshold`` (``strict=False`` keeps ``<=``).
3. **Ties.** Features are ranked by descending forget frequency, ties broken by the lower feature index (a stable
   sort). SAEBench ranks with numpy's default ``argsort()[::-1]``, an unstable sort whose order among equal
   values depends on the numpy build (its SIMD sorts do not keep index order), so there is no fixed tie rule to
   copy; mechun fixes this one. Ties are common: frequencies are counts over one token total, and rounding
   (point 4) merges near-equal ones.
4. **Six decimals.** SAEBench writes the frequencies with ``np.savetxt(fmt="%f")`` and selects on what it reads
   back; :func:`select_features` rounds both frequencies to 6 decimals (half to even, in float64, which equals
   that round trip for float32 frequencies) before thresholding and ranking (``decimals=None``: exact values).
   A forget frequency that rounds to 0 counts as never firing.
5. **Counted tokens.** Frequencies are over every real token except BOS, EOS and pad token ids *wherever they
   occur* (SAEBench's ``mask_bos_pad_eos_tokens=True``). The old count, every real token but position 0, is
   ``feature_stats(..., skip_special=False, skip_first=True)``.

This module trains SAEs offline on a (bridge) model with sae-lens, loads them from disk (or the hub for online
users), computes feature statistics, selects features, and provides the intervention as a context manager.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Float64, Int
from torch import Tensor

from mechun.cache import cache_residuals
from mechun.errors import DamagedFileError, MechunError, ModelMismatchError
from mechun.hooks import hooks
from mechun.models import (
    HOOK_KINDS,
    Model,
    check_layer,
    d_model,
    hook_layer,
    hook_name,
    looks_like_path,
    model_device,
    tokenize,
)
from mechun.progress import quiet_dependencies

#: How an intervention edits the selected features where they are active.
SAEMode = Literal["clamp", "scale", "zero"]
MODES: tuple[SAEMode, ...] = get_args(SAEMode)


def _hook_of(sae: Any) -> str:
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else getattr(sae.cfg, "hook_name", None)
    if not name:
        raise MechunError("this SAE does not record its hook name; pass hook= explicitly")
    return name


def check_sae(model: Model, sae: Any, hook: str | None = None) -> str:
    """The SAE's hook name, once the SAE fits the model: its input width is the model's ``d_model`` and its layer
    exists. Else a :class:`ModelMismatchError` (an SAE trained on another model)."""
    hook = hook or _hook_of(sae)
    d_in = int(sae.W_dec.shape[1])
    if d_in != d_model(model):
        raise ModelMismatchError(f"the SAE reads vectors of d_in={d_in} but the model's residual stream has "
                                 f"d_model={d_model(model)}: it was trained on another model; train one on this "
                                 "model (mechun sae train)")
    if hook_layer(hook) is not None:
        check_layer(model, hook_layer(hook))
    return hook


def _layer_kind(hook: str) -> tuple[int, str]:
    """``blocks.3.hook_resid_post`` -> ``(3, "resid_post")``."""
    parts = hook.split(".")
    kind = parts[-1].removeprefix("hook_")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or kind not in HOOK_KINDS:
        raise MechunError(f"cannot read feature statistics at hook {hook!r}; mechun caches "
                          f"blocks.{{layer}}.hook_{{kind}} with kind in {HOOK_KINDS}")
    return int(parts[1]), kind


#: Activations are scaled to a mean norm of sqrt(d_in) while training (sae-lens folds the factor into the weights
#: afterwards, so the SAE reads raw activations), as SAEBench's SAEs are: the L1 penalty then means the same at any
#: residual norm. Without it a model with larger activations got only dense features, none specific to a domain;
#: with it, L1 coefficient 1 still did (0 of 128 features specific to a domain on the tiny organism), 5 gives 22.
NORMALIZE = "expected_average_only_in"


def train_sae(
    model: Model,
    texts: Sequence[str],
    layer: int,
    architecture: str = "standard",
    d_sae: int = 256,
    k: int = 16,
    l1_coefficient: float = 5.0,
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
        sae_cfg = StandardTrainingSAEConfig(d_in=d_model(model), d_sae=d_sae, l1_coefficient=l1_coefficient,
                                           normalize_activations=NORMALIZE)
    elif architecture == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=d_model(model), d_sae=d_sae, k=k, normalize_activations=NORMALIZE)
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
        n_batches_for_norm_estimate=20,  # of 512 tokens each: the mean norm settles long before sae-lens' 1,000
        logger=LoggingConfig(log_to_wandb=False), output_path=None, checkpoint_path=None, n_checkpoints=0,
        save_final_checkpoint=False,
    )
    torch.manual_seed(seed)
    with _quiet_sae_lens():
        return LanguageModelSAETrainingRunner(cfg, override_model=model,
                                              override_dataset=Dataset.from_dict({"input_ids": chunks})).run()


_SAE_LENS_BAR_MODULES = ("sae_lens.training.sae_trainer", "sae_lens.training.activation_scaler",
                         "sae_lens.training.activations_store")


@contextmanager
def _quiet_sae_lens() -> Iterator[None]:
    """sae-lens' training bars, its log warnings about the overridden model and dataset (mechun passes both on
    purpose: that is how it trains offline) and the UserWarnings its activation store raises on a small in-memory
    dataset (mechun cycles it by design) stay out of the user's output; everything is restored on exit."""
    import importlib
    import logging
    import warnings
    from functools import partial

    from tqdm.auto import tqdm

    patched = []
    for name in _SAE_LENS_BAR_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))
            module.tqdm = partial(tqdm, disable=True)
    logger = logging.getLogger("sae_lens")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_dependencies():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"sae_lens\.")
            yield
    finally:
        logger.setLevel(level)
        for module, original in patched:
            module.tqdm = original


def save_sae(sae: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Save an SAE as a sae-lens dir, whole or not at all (``overwrite``: replace an earlier mechun output)."""
    from mechun.io import atomic_dir

    with atomic_dir(path, "sae", overwrite) as tmp:
        sae.save_inference_model(str(tmp)) if hasattr(sae, "save_inference_model") else sae.save_model(str(tmp))
    return Path(path)


def load_sae(path_or_release: str | Path, sae_id: str | None = None, device: str = "cpu") -> Any:
    """A local sae-lens SAE dir, or (online) a sae-lens release + id via ``SAE.from_pretrained``."""
    from sae_lens import SAE

    p = Path(path_or_release)
    if p.is_dir():
        try:
            return SAE.load_from_disk(str(p), device=device)
        except Exception as e:  # sae-lens raises what its readers raise: JSON, safetensors, KeyError, ...
            raise DamagedFileError(f"{p} is not a readable sae-lens SAE dir ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:200]}); recreate it with `mechun sae train`") from e
    if p.exists() or looks_like_path(str(path_or_release)):
        raise MechunError(f"{path_or_release} is not an SAE directory; pass the dir `mechun sae train` wrote")
    if sae_id is None:
        raise MechunError(f"{path_or_release} is not a local SAE dir; for the hub pass a release and sae_id")
    return SAE.from_pretrained(str(path_or_release), sae_id, device=device)


@dataclass
class FeatureStats:
    frequency: Float[Tensor, " d_sae"]  # fraction of counted tokens where the feature is active (float32, unrounded)
    mean_activation: Float[Tensor, " d_sae"]  # mean activation where active
    n_tokens: int  # tokens counted


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's BOS, EOS and pad ids (those it has): the tokens SAEBench leaves out of frequencies."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({int(i) for i in ids if i is not None})


def counted_positions(
    ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"],
    special_ids: Sequence[int] = (),
    skip_first: bool = False,
) -> Bool[Tensor, "batch pos"]:
    """The tokens feature frequencies count: real (unpadded) tokens whose id is not in ``special_ids``, wherever
    they occur; ``skip_first`` also drops position 0 of every prompt (mechun's old rule, with no special ids)."""
    special = torch.tensor(list(special_ids), dtype=ids.dtype, device=ids.device)
    keep = attention_mask.bool() & ~torch.isin(ids, special)
    if skip_first:
        keep[:, 0] = False
    return keep


def stats_from_activations(acts: Float[Tensor, "n d_sae"]) -> FeatureStats:
    """Frequency (active = ``> 0``; count / n in float32, as SAEBench) and mean activation where active."""
    if acts.shape[0] == 0:
        raise MechunError("no tokens to count: every token was BOS, EOS or padding; pass longer prompts")
    active = acts > 0
    count = active.sum(0)
    freq = count.to(torch.float32) / acts.shape[0]
    mean = (acts * active).sum(0) / count.clamp_min(1)
    return FeatureStats(freq.cpu(), mean.float().cpu(), int(acts.shape[0]))


@torch.inference_mode()
def _encode_counted(model: Model, sae: Any, prompts: Sequence[str], hook: str | None, skip_special: bool,
                    skip_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """SAE activations at the counted tokens (``n d_sae``, row-major over prompts), the token ids, the kept mask."""
    hook = hook or _hook_of(sae)
    layer, kind = _layer_kind(hook)
    check_sae(model, sae, hook)
    ids, attn = tokenize(model, list(prompts))
    keep = counted_positions(ids, attn, special_token_ids(model.tokenizer) if skip_special else (), skip_first)
    cache = cache_residuals(model, ids, layers=[layer], positions=keep, attention_mask=attn, hook=kind,
                            progress=False)
    acts = sae.encode(cache[layer].to(sae.W_dec.device, sae.W_dec.dtype))
    return acts, ids, keep


@torch.inference_mode()
def feature_stats(model: Model, sae: Any, prompts: Sequence[str], hook: str | None = None,
                  skip_special: bool = True, skip_first: bool = False) -> FeatureStats:
    """Activation frequency and mean activation of every feature over the prompts' tokens, BOS, EOS and pad tokens
    excluded wherever they occur (SAEBench; ``skip_special=False, skip_first=True`` is the old count)."""
    acts, _, _ = _encode_counted(model, sae, prompts, hook, skip_special, skip_first)
    return stats_from_activations(acts)


@dataclass
class DomainSAE:
    """An SAE trained on a model's text, with its features' firing on one forget corpus and on the retain corpus:
    what every SAE unlearning experiment starts from."""

    sae: Any
    layer: int
    forget: FeatureStats
    retain: FeatureStats

    def select(self, retain_threshold: float = 0.01, n: int = 10) -> list[int]:
        """SAEBench's selection (:func:`select_features`)."""
        return select_features(self.forget, self.retain, retain_threshold=retain_threshold, n=n)

    def counts(self, retain_threshold: float = 0.01, min_forget: float = 0.01) -> dict[str, int]:
        """How many features pass SAEBench's rule (retain frequency below ``retain_threshold``, firing on forget
        text), how many of those fire on at least ``min_forget`` of forget tokens, and how many fire at all."""
        f, r = round_frequency(self.forget.frequency), round_frequency(self.retain.frequency)
        specific = r < retain_threshold
        return {"d_sae": int(f.shape[0]), "passing": int((specific & (f > 0)).sum()),
                f"passing_forget_freq_{min_forget:g}": int((specific & (f >= min_forget)).sum()),
                "alive": int(((f > 0) | (r > 0)).sum())}


def domain_sae(model: Model, texts: Sequence[str], forget_texts: Sequence[str], retain_texts: Sequence[str],
               layer: int, d_sae: int | None = None, training_tokens: int = 80_000, seed: int = 0) -> DomainSAE:
    """Train an SAE on ``texts`` at ``blocks.{layer}.hook_resid_post`` (``d_sae`` default 8 x d_model) and count
    its features' firing on ``forget_texts`` and ``retain_texts`` (:func:`feature_stats`)."""
    sae = train_sae(model, texts, layer=layer, d_sae=d_sae or 8 * d_model(model), training_tokens=training_tokens,
                    seed=seed)
    return DomainSAE(sae, layer, feature_stats(model, sae, forget_texts), feature_stats(model, sae, retain_texts))


def round_frequency(freq: Float[Tensor, "*shape"], decimals: int = 6) -> Float64[Tensor, "*shape"]:
    """Round half to even at ``decimals`` places, in float64: for float32 input (times 1e6 is exact) this equals
    SAEBench's ``np.savetxt(fmt="%f")`` then ``np.loadtxt`` round trip."""
    if decimals < 0:
        raise MechunError(f"decimals must be >= 0, got {decimals}")
    scale = 10.0 ** decimals
    return torch.round(freq.to(torch.float64) * scale) / scale


def select_features(forget: FeatureStats, retain: FeatureStats, retain_threshold: float = 0.01, n: int = 10,
                    strict: bool = True, decimals: int | None = 6) -> list[int]:
    """SAEBench's rule: features whose retain frequency is below ``retain_threshold`` (``<=`` if not ``strict``)
    and that fire on forget text at all, by descending forget frequency (ties: lower index first), top ``n``.
    Frequencies are first rounded to ``decimals`` places (None: not rounded). See the module docstring."""
    f, r = forget.frequency, retain.frequency
    if f.shape != r.shape:
        raise MechunError(f"forget stats have {f.shape[0]} features but retain stats {r.shape[0]}; same SAE?")
    if decimals is not None:
        f, r = round_frequency(f, decimals), round_frequency(r, decimals)
    ok = (r < retain_threshold if strict else r <= retain_threshold) & (f > 0)
    key = torch.where(ok, f, torch.full_like(f, -1.0))
    order = torch.sort(key, descending=True, stable=True).indices
    return [int(i) for i in order[: min(n, int(ok.sum()))]]


def edit_features(acts: Float[Tensor, "*batch d_sae"], features: Sequence[int], mode: SAEMode,
                  value: float) -> Float[Tensor, "*batch d_sae"]:
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


def edit_residual(x: Float[Tensor, "batch pos *rest"], sae: Any, features: Sequence[int], mode: SAEMode = "clamp",
                  value: float = 50.0, skip_bos: bool = True) -> Float[Tensor, "batch pos *rest"]:
    """What the intervention hook computes: ``decode(edit(encode(x))) + (x - decode(encode(x)))`` in the SAE's
    dtype; with ``skip_bos`` position 0 is returned exactly as given (SAEBench)."""
    xs = x.to(sae.W_dec.dtype)
    f = sae.encode(xs)
    out = (sae.decode(edit_features(f, features, mode, value)) + (xs - sae.decode(f))).to(x.dtype)
    return torch.cat([x[:, :1], out[:, 1:]], dim=1) if skip_bos else out


@contextmanager
def sae_intervention(model: Model, sae: Any, features: Sequence[int], mode: SAEMode = "clamp", value: float = 50.0,
                     hook: str | None = None, skip_bos: bool = True) -> Iterator[None]:
    """Within the block, the residual stream at the SAE's hook becomes
    ``decode(edit(encode(x))) + (x - decode(encode(x)))``: only the named features change. Position 0 (BOS) of
    every forward is left untouched unless ``skip_bos=False`` (see the module docstring)."""
    hook = check_sae(model, sae, hook)
    features = list(features)
    if not features:
        raise MechunError("no features selected; loosen the retain threshold or pass feature ids")
    d_sae = sae.W_dec.shape[0]
    if min(features) < 0 or max(features) >= d_sae:
        raise MechunError(f"feature ids must be in 0..{d_sae - 1}")
    if mode not in MODES:
        raise MechunError(f"mode must be one of {MODES}, got {mode!r}")

    def fn(x: Tensor) -> Tensor:
        return edit_residual(x, sae, features, mode, value, skip_bos)

    with hooks(model, [(hook, fn)]):
        yield


def top_activating(model: Model, sae: Any, prompts: Sequence[str], feature: int, k: int = 5,
                   hook: str | None = None) -> list[tuple[float, str, str]]:
    """Feature card: the ``k`` (activation, prompt, token) with the highest activation of ``feature``, over the
    tokens :func:`feature_stats` counts."""
    acts, ids, keep = _encode_counted(model, sae, prompts, hook, skip_special=True, skip_first=False)
    acts = acts[:, feature].cpu()
    idx = keep.nonzero()
    out = []
    for j in torch.argsort(acts, descending=True)[:k].tolist():
        b, p = idx[j].tolist()
        out.append((float(acts[j]), prompts[b], model.tokenizer.convert_ids_to_tokens(int(ids[b, p]))))
    return out
