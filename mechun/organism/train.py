"""Train a model organism: a small GPT-2 that learns a synthetic knowledge world, saved as a local HF checkpoint.

The organism is trained with the ordinary causal language-modelling loss on every sentence of the world (the
training templates, multiple-choice questions in a few option orders, filler text). Held-out paraphrase templates
and fresh option orders are never seen, so the evaluation says how far the knowledge generalises beyond the
trained formats. The checkpoint dir is what a real user would have for ``gpt2``: ``config.json``,
``model.safetensors`` and tokenizer files, plus ``world.json`` (the facts) and ``training.json`` (how it was made).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from mechun.errors import DamagedFileError, MechunError, OutputError
from mechun.io import atomic_dir, check_out_dir
from mechun.organism.tokenizer import build_tokenizer
from mechun.organism.world import WORLD_VERSION, World


@dataclass(frozen=True)
class Preset:
    subjects_per_domain: int
    n_layer: int
    d_model: int
    n_head: int
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    mcq_per_fact: int = 2
    n_filler: int = 200
    context_texts: int = 0  # two-sentence texts (see World.training_texts)


PRESETS: dict[str, Preset] = {
    # Tests: a few seconds on 2 cores.
    "tiny": Preset(subjects_per_domain=8, n_layer=3, d_model=64, n_head=4, steps=400, mcq_per_fact=2, n_filler=100,
                   context_texts=256),
    # The main job: about 2.5 minutes on 2 cores (158.7 s measured for seed 0), once per machine (cached).
    "small": Preset(subjects_per_domain=12, n_layer=6, d_model=96, n_head=4, steps=900, mcq_per_fact=6,
                    context_texts=384),
}


def _batches(ids: torch.Tensor, batch_size: int, steps: int, gen: torch.Generator):
    n = ids.shape[0]
    order = torch.randperm(n, generator=gen)
    i = 0
    for _ in range(steps):
        if i + batch_size > n:
            order, i = torch.randperm(n, generator=gen), 0
        yield ids[order[i:i + batch_size]]
        i += batch_size


def _resolve_preset(preset: str | Preset) -> tuple[str, Preset]:
    """The preset's name ("custom" for a :class:`Preset` instance) and settings."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise MechunError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return preset, PRESETS[preset]
    return "custom", preset


def _encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> Int[Tensor, "n 2 pos"]:
    """The padded texts as stacked ``(input_ids, labels)`` pairs; labels are -100 on padding."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    if (ids == tokenizer.unk_token_id).any():
        raise MechunError("the world produced words outside its own vocabulary (a bug in the world generator)")
    labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
    return torch.stack([ids, labels], 1)


def _build_model(tokenizer: PreTrainedTokenizerFast, preset: Preset, text_len: int) -> torch.nn.Module:
    """A freshly initialised GPT-2 (no dropout) sized by ``preset``, with room for twice the longest text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(64, text_len * 2), n_embd=preset.d_model,
        n_layer=preset.n_layer, n_head=preset.n_head, n_inner=4 * preset.d_model,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _fit(model: torch.nn.Module, data: Int[Tensor, "n 2 pos"], preset: Preset, steps: int, seed: int, desc: str,
         progress: bool) -> list[float]:
    """Train ``model`` in place (AdamW, warmup then cosine decay, clipped gradients); returns each step's loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, mininterval=1.0)
    for step, batch in enumerate(_batches(data, preset.batch_size, steps, gen)):
        x, y = batch[:, 0], batch[:, 1]
        width = int((y != -100).sum(1).max())
        loss = model(input_ids=x[:, :width], labels=y[:, :width]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    return losses


def train_organism(
    out_dir: str | Path,
    preset: str | Preset = "tiny",
    seed: int = 0,
    progress: bool = True,
    steps: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate the world for ``seed``, train a GPT-2 on it and save the checkpoint dir ``out_dir`` (whole or not at
    all; ``overwrite`` replaces an earlier mechun output there, never anything else).

    Deterministic on CPU: the same preset and seed give the same weights.
    """
    name, preset = _resolve_preset(preset)
    out = check_out_dir(out_dir, overwrite)
    steps = steps if steps is not None else preset.steps

    torch.manual_seed(seed)
    world = World.generate(seed, preset.subjects_per_domain, n_filler=preset.n_filler)
    tokenizer = build_tokenizer(world.vocabulary())
    texts = world.training_texts(mcq_per_fact=preset.mcq_per_fact, context_texts=preset.context_texts)
    data = _encode(tokenizer, texts)
    model = _build_model(tokenizer, preset, data.shape[2])
    t0 = time.time()
    losses = _fit(model, data, preset, steps, seed, f"training organism ({name}, seed {seed})", progress)

    with atomic_dir(out, "organism", overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        world.save(tmp / "world.json")
        info = {"preset": name, "config": asdict(preset), "seed": seed, "steps": steps,
                "world_version": WORLD_VERSION, "trainer_version": TRAINER_VERSION,
                "seconds": round(time.time() - t0, 2), "final_loss": losses[-1],
                "loss_curve": losses[:: max(1, len(losses) // 200)], "n_texts": len(texts)}
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
    return out


#: Bumped whenever training would give other weights for the same preset, seed and world (recipe, schedule, data
#: order): the per-machine cache keys on it.
TRAINER_VERSION = 1


def cache_root() -> Path:
    """Where trained organisms are kept, once per machine: ``$MECHUN_CACHE`` or ``~/.cache/mechun``."""
    return Path(os.environ.get("MECHUN_CACHE") or Path.home() / ".cache" / "mechun")


def _entry(preset: str, seed: int) -> Path:
    return cache_root() / "organisms" / f"{preset}-seed{seed}-world{WORLD_VERSION}-trainer{TRAINER_VERSION}"


def _entry_ok(entry: Path, preset: str, seed: int) -> bool:
    """A complete entry (its manifest lists every file, unchanged) of this preset and seed."""
    from mechun.io import foreign_files, read_manifest

    manifest = read_manifest(entry)
    if manifest is None or not manifest.get("complete") or foreign_files(entry):
        return False
    try:
        made = json.loads((entry / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return made.get("preset") == preset and made.get("seed") == seed and made.get("config") == asdict(PRESETS[preset])


def cached_organism(preset: str = "small", seed: int = 0, progress: bool = True) -> Path:
    """The organism of ``preset`` and ``seed``, trained once per machine and reused (a few milliseconds warm).

    Entries live in :func:`cache_root` keyed by preset, seed, :data:`WORLD_VERSION` and :data:`TRAINER_VERSION`, are
    written whole (:func:`mechun.io.atomic_dir`), and are checked against their manifest on every use: a corrupt
    or partial entry is removed and retrained, never used. Concurrent callers wait for one training (a file lock).
    """
    import fcntl

    _resolve_preset(preset)
    entry = _entry(preset, seed)
    if _entry_ok(entry, preset, seed):
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"the organism cache {cache_root()} cannot hold entries ({e.strerror}: {e.filename}); set "
                          "MECHUN_CACHE to a writable directory (default ~/.cache/mechun)") from e
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _entry_ok(entry, preset, seed):  # another process trained it while we waited
            return entry
        if entry.exists():
            shutil.rmtree(entry)  # mechun's own cache entry, damaged or partial
        return train_organism(entry, preset=preset, seed=seed, progress=progress)


def copy_organism(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy an organism checkpoint dir to ``out`` (whole or not at all)."""
    with atomic_dir(out, "organism", overwrite) as tmp:
        for f in Path(src).iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
    return Path(out)


def mcq_orders_trained(ckpt: str | Path, default: int = 2) -> int:
    """How many MCQ option orders per fact the organism at ``ckpt`` was trained on (its forget corpus has these)."""
    info = Path(ckpt) / "training.json"
    if not info.is_file():
        return default
    try:
        value = json.loads(info.read_text())["config"]["mcq_per_fact"]
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedFileError(f"{info} is damaged ({type(e).__name__}: {e}); copy it back from the organism it "
                               "came with") from e
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DamagedFileError(f"{info}: config.mcq_per_fact is {value!r}, not a positive integer; the file is "
                               "damaged: copy it back from the organism it came with")
    return value
