"""Train a model organism: a small GPT-2 that learns a synthetic knowledge world, saved as a local HF checkpoint.

The organism is trained with the ordinary causal language-modelling loss on every sentence of the world (the
training templates, multiple-choice questions in a few option orders, filler text). Held-out paraphrase templates
and fresh option orders are never seen, so the evaluation says how far the knowledge generalises beyond the
trained formats. The checkpoint dir is what a real user would have for ``gpt2``: ``config.json``,
``model.safetensors`` and tokenizer files, plus ``world.json`` (the facts) and ``training.json`` (how it was made).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from mechun.errors import MechunError, OutputError
from mechun.io import atomic_dir, check_out_dir
from mechun.organism.tokenizer import build_tokenizer
from mechun.organism.world import WORLD_VERSION, Fact, World
from mechun.progress import progress_bar, quiet_dependencies


@dataclass(frozen=True)
class Preset:
    subjects_per_domain: int
    n_layer: int
    d_model: int
    n_head: int
    steps: int
    batch_size: int = 32
    seq_len: int = 128  # documents are packed into rows of this many tokens, no padding
    lr: float = 3e-3
    passages_per_subject: int = 1  # per epoch (each passage states all of the subject's facts once)
    mcq_per_fact: int = 2  # option orders per MCQ-trained fact and epoch
    statements_per_fact: int = 0  # one-sentence documents per fact and epoch
    answer_weight: float = 1.0  # loss weight of the named option's first token in an answered MCQ
    letter_weight: float = 1.0  # loss weight of its letter (the last token)
    n_filler: int = 200
    # Repeated random token sequences per epoch (``x x``, LM loss on all): practice at the copy the MCQ letter is
    # (the token that followed the named option). Their lengths vary (uniform in ``repeat_lens``): at one fixed
    # length (10, trainer 4) every seed learned to copy the token 10 back instead, which the MCQ letter cannot use;
    # 400 of varied length an epoch did not teach the copy in 1,800 steps (seed 1), 1,200 did (trainer 5: the MCQ
    # letter given the named option 1.00 on seeds 1 and 2). At 1,200 an epoch they are 30 % of the tokens and the
    # held-out-subject probes fell (9-15 of 18 relations >= 0.8 against 18 with trainer 4), so trainer 6 keeps
    # 1,200 only for the first ``repeat_epochs`` epochs, then ``repeats_after``, and with ``repeats_avoid_facts``
    # draws them from words that are neither a subject's name nor a value: a value or name word seen in random
    # contexts is a word whose embedding the facts do not own alone. Seed 0, 2,400 steps: probes 13 of 18 with 1,200
    # of any word throughout, 18 (0.84-0.95) with the schedule, 18 (0.92-1.00) with the schedule and fact-free
    # repeats, MCQ 0.92-0.99 and 0.99-1.00 by domain. The cost of fact-free repeats: the copy is learned for the
    # words practised (298 of 662; copy accuracy 0.99 at lengths 4-20), not for the rest (0.12-0.22 on repeats of
    # any word; 0.98-1.00 with the schedule alone), and the MCQ letter is learned from the answered questions.
    repeats_per_epoch: int = 0
    repeat_lens: tuple[int, int] = (4, 24)
    repeat_epochs: int | None = None  # epochs with ``repeats_per_epoch`` (None: every epoch)
    repeats_after: int = 0  # repeats per epoch after the first ``repeat_epochs``
    repeats_avoid_facts: bool = False

    def __post_init__(self) -> None:
        """Refuse, in one line and before any training, a recipe that would fail or mislead mid-run."""
        lo, hi = self.repeat_lens
        if not 1 <= lo <= hi or 2 * hi + 1 > self.seq_len:
            raise MechunError(f"repeat_lens={self.repeat_lens} must be (shortest, longest) with 1 <= shortest <= "
                              f"longest and 2 x longest + 1 <= seq_len={self.seq_len}")
        for name in ("answer_weight", "letter_weight", "lr"):
            if not getattr(self, name) > 0:
                raise MechunError(f"{name}={getattr(self, name)} must be positive")
        for name in ("repeats_per_epoch", "repeats_after", "repeat_epochs"):
            if (getattr(self, name) or 0) < 0:
                raise MechunError(f"{name}={getattr(self, name)} must not be negative")


PRESETS: dict[str, Preset] = {
    # Tests: about 35 s on 2 cores; 6 subjects per domain (450 steps, 29 s, left one domain of one seed at 0.94).
    "tiny": Preset(subjects_per_domain=6, n_layer=3, d_model=64, n_head=4, steps=560, batch_size=16, seq_len=64,
                   lr=8e-3, statements_per_fact=4, mcq_per_fact=1, n_filler=30),
    # The main organism: 6 domains x 64 subjects x 3 relations (1,152 facts); trained once per machine (cached).
    # 2,400 steps (627 s on 2 cores here): trainer 5's 1,800 left 9 of 18 probes below 0.8 on seed 0 and 2,400 left 5
    # (with repeats of every word throughout, see above). 34 epochs of 1,200 repeats are the first ~1,000 steps.
    "main": Preset(subjects_per_domain=64, n_layer=4, d_model=128, n_head=4, steps=2400, batch_size=32,
                   seq_len=128, lr=3e-3, statements_per_fact=2, mcq_per_fact=2, answer_weight=5.0,
                   letter_weight=5.0, repeats_per_epoch=1200, repeat_epochs=34, repeats_after=300,
                   repeats_avoid_facts=True),
}
DEFAULT_PRESET = "main"


def _resolve_preset(preset: str | Preset) -> tuple[str, Preset]:
    """The preset's name ("custom" for a :class:`Preset` instance) and settings."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise MechunError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return preset, PRESETS[preset]
    return "custom", preset


def _repeat_words(world: World, tokenizer: PreTrainedTokenizerFast, preset: Preset) -> list[int]:
    """The token ids repeated random sequences are drawn from: every word (no special token), or with
    ``repeats_avoid_facts`` those of no subject's name and no value (:meth:`World.name_and_value_words`). Refuses,
    in one line, a ``repeat_lens`` longer than the words there are to draw without repetition."""
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(len(tokenizer)) if i not in special]
    if preset.repeats_avoid_facts:
        avoid = set(tokenizer.convert_tokens_to_ids(sorted(world.name_and_value_words())))
        words = [i for i in words if i not in avoid]
    if (preset.repeats_per_epoch or preset.repeats_after) and preset.repeat_lens[1] > len(words):
        raise MechunError(f"repeat_lens={preset.repeat_lens} draws up to {preset.repeat_lens[1]} distinct words, but "
                          f"only {len(words)} are allowed in repeats"
                          f"{' (repeats_avoid_facts=True)' if preset.repeats_avoid_facts else ''}; lower repeat_lens")
    return words


def _epoch_documents(world: World, tokenizer: PreTrainedTokenizerFast, preset: Preset, seed: int, epoch: int,
                     words: Sequence[int], exclude: frozenset[str] = frozenset()) -> list[list[int]]:
    """One epoch of the world's documents (:meth:`World.documents`, none naming a subject in ``exclude``) and the
    epoch's repeated random sequences (:class:`Preset`) of ``words`` (:func:`_repeat_words`), in a shuffled order,
    tokenised (each starts with ``<bos>``)."""
    rng = random.Random(f"epoch-{seed}-{epoch}")
    docs = world.documents(rng, preset.passages_per_subject, preset.mcq_per_fact, preset.n_filler, epoch,
                           preset.statements_per_fact, exclude)
    ids = tokenizer(docs)["input_ids"]
    if any(tokenizer.unk_token_id in doc for doc in ids):
        raise MechunError("the world produced words outside its own vocabulary (a bug in the world generator)")
    late = preset.repeat_epochs is not None and epoch >= preset.repeat_epochs
    for _ in range(preset.repeats_after if late else preset.repeats_per_epoch):
        seq = rng.sample(words, rng.randint(*preset.repeat_lens))
        ids.append([tokenizer.bos_token_id, *seq, *seq])
    rng.shuffle(ids)
    if max(map(len, ids)) > preset.seq_len:
        raise MechunError(f"a training document is longer than seq_len={preset.seq_len} tokens; raise seq_len")
    return ids


#: One packed batch: token ids, the loss weight of predicting each token (0 on padding and on each document's
#: first token), position ids (restarting at each document) and the block-diagonal causal attention mask (a token
#: attends only to earlier tokens of its own document).
Packed = tuple[Int[Tensor, "batch seq"], Float[Tensor, "batch seq"], Int[Tensor, "batch seq"],
               Bool[Tensor, "batch 1 seq seq"]]


class MCQMarks(NamedTuple):
    """The token ids that frame an answered question (:func:`_answer_positions`)."""

    question: int
    colon: int
    what: int
    answer: int


def _answer_positions(doc: list[int], marks: MCQMarks) -> tuple[int, int] | None:
    """In an answered question (``question : {stem} what ? ... answer : {stem} {option} {letter}``, the
    organism's :func:`~mechun.organism.world.mcq_text`), the positions of the named option's first token and of the
    letter (the last token); None for any other document."""
    if doc[1:3] != [marks.question, marks.colon] or marks.what not in doc:
        return None
    stem = doc.index(marks.what) - 3
    after = next((j + 2 for j in range(len(doc) - 1, 2, -1) if doc[j:j + 2] == [marks.answer, marks.colon]), None)
    if after is None or after + stem >= len(doc) - 1:
        return None
    return after + stem, len(doc) - 1


def _pack(docs: list[list[int]], seq_len: int, pad: int, marks: MCQMarks | None = None,
          answer_weight: float = 1.0, letter_weight: float = 1.0) -> Packed:
    """Whole documents laid end to end in rows of ``seq_len`` (a document that does not fit starts the next row):
    each is trained exactly as if it were alone at position 0, as evaluation prompts are, and almost nothing is
    spent on padding. In an answered question (:func:`_answer_positions`, found by ``marks``) the named option's
    first token weighs ``answer_weight`` in the loss and the letter ``letter_weight``: two tokens in forty of a
    question, they would otherwise be learned last."""
    rows: list[list[list[int]]] = [[]]
    used = 0  # tokens in the last row
    for doc in docs:
        if used + len(doc) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += len(doc)
    ids = torch.full((len(rows), seq_len), pad)
    pos = torch.zeros((len(rows), seq_len), dtype=torch.long)
    doc_of = torch.full((len(rows), seq_len), -1)
    named = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    letter = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for r, row in enumerate(rows):
        i = 0
        for k, doc in enumerate(row):
            ids[r, i:i + len(doc)] = torch.tensor(doc)
            pos[r, i:i + len(doc)] = torch.arange(len(doc))
            doc_of[r, i:i + len(doc)] = k
            answered = _answer_positions(doc, marks) if marks is not None else None
            if answered is not None:
                named[r, i + answered[0]] = letter[r, i + answered[1]] = True
            i += len(doc)
    weight = (doc_of >= 0).float()
    weight[pos == 0] = 0.0
    weight[named] = answer_weight
    weight[letter] = letter_weight
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask = (doc_of[:, :, None] == doc_of[:, None, :]) & causal
    mask |= torch.eye(seq_len, dtype=torch.bool)  # padding attends to itself (no empty softmax rows)
    return ids, weight, pos, mask[:, None]


def _packed_batches(world: World, tokenizer: PreTrainedTokenizerFast, preset: Preset, seed: int,
                    words: Sequence[int], exclude: frozenset[str] = frozenset()) -> Iterator[Packed]:
    """Batches of ``batch_size`` packed rows (:func:`_pack`), epoch after epoch, forever."""
    epoch = 0
    marks = MCQMarks(*tokenizer.convert_tokens_to_ids(["question", ":", "what", "answer"]))
    while True:
        docs = _epoch_documents(world, tokenizer, preset, seed, epoch, words, exclude)
        ids, weight, pos, mask = _pack(docs, preset.seq_len, tokenizer.pad_token_id, marks, preset.answer_weight,
                                     preset.letter_weight)
        for i in range(0, ids.shape[0] - preset.batch_size + 1, preset.batch_size):
            j = slice(i, i + preset.batch_size)
            yield ids[j], weight[j], pos[j], mask[j]
        epoch += 1


def _build_model(tokenizer: PreTrainedTokenizerFast, preset: Preset) -> torch.nn.Module:
    """A freshly initialised GPT-2 (no dropout) sized by ``preset``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(256, preset.seq_len), n_embd=preset.d_model,
        n_layer=preset.n_layer, n_head=preset.n_head, n_inner=4 * preset.d_model,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # PyTorch's fused tanh GELU: the same function as GPT-2's gelu_new (within 3e-7), whose five elementwise ops
        # were a fifth of a training step on the CPU (512 -> 416 ms a step on the main preset).
        activation_function="gelu_pytorch_tanh",
    )
    return GPT2LMHeadModel(config)


def _fit(model: torch.nn.Module, batches: Iterator[Packed], preset: Preset, steps: int, desc: str, progress: bool,
         ) -> list[float]:
    """Train ``model`` in place (AdamW, warmup then cosine decay to a tenth, clipped gradients); returns each step's
    loss. The bar shows the loss and the time left."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    losses: list[float] = []
    bar = progress_bar(total=steps, desc=desc, disable=not progress, mininterval=1.0)
    for step in range(steps):
        ids, weight, pos, mask = next(batches)
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        w = weight[:, 1:].flatten()
        loss = (ce * w).sum() / w.sum()
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
    preset: str | Preset = DEFAULT_PRESET,
    seed: int = 0,
    progress: bool = True,
    steps: int | None = None,
    overwrite: bool = False,
    without: str | Sequence[str] | None = None,
) -> Path:
    """Generate the world for ``seed``, train a GPT-2 on it and save the checkpoint dir ``out_dir`` (whole or not at
    all; ``overwrite`` replaces an earlier mechun output there, never anything else).

    ``without`` makes the **retain oracle**: the same world, tokenizer, seed and schedule, but no training document
    names a subject of the given forget domain(s), subjects or facts (:meth:`World.excluded_subjects`) -- the model
    an exact unlearning would give. ``world.json`` is the whole world; ``training.json`` records what was left out.

    Deterministic on CPU: the same preset, seed and ``without`` give the same weights.
    """
    name, preset = _resolve_preset(preset)
    out = check_out_dir(out_dir, overwrite)
    steps = steps if steps is not None else preset.steps

    torch.manual_seed(seed)
    world = World.generate(seed, preset.subjects_per_domain, n_filler=preset.n_filler)
    exclude = world.excluded_subjects(without) if without is not None else frozenset()
    tokenizer = build_tokenizer(world.vocabulary())
    words = _repeat_words(world, tokenizer, preset)  # refuses impossible repeats before any training
    model = _build_model(tokenizer, preset)
    t0 = time.time()
    what = f"{name}, seed {seed}" + (f", without {_without_label(without)}" if exclude else "")
    losses = _fit(model, _packed_batches(world, tokenizer, preset, seed, words, exclude), preset, steps,
                  f"training {'retain oracle' if exclude else 'organism'} ({what})", progress)

    with atomic_dir(out, "organism", overwrite) as tmp, quiet_dependencies():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        world.save(tmp / "world.json")
        info = {"preset": name, "config": asdict(preset), "seed": seed, "steps": steps,
                "world_version": WORLD_VERSION, "trainer_version": TRAINER_VERSION,
                "seconds": round(time.time() - t0, 2), "final_loss": losses[-1],
                "loss_curve": losses[:: max(1, len(losses) // 200)],
                "tokens": steps * preset.batch_size * preset.seq_len,
                "without": sorted(exclude) if exclude else None,
                "without_spec": _without_spec(without)}
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
    return out


#: Bumped whenever training would give other weights for the same preset, seed and world (recipe, schedule, data
#: order): the per-machine cache keys on it.
TRAINER_VERSION = 6


def cache_root() -> Path:
    """Where trained organisms are kept, once per machine: ``$MECHUN_CACHE`` or ``~/.cache/mechun``."""
    return Path(os.environ.get("MECHUN_CACHE") or Path.home() / ".cache" / "mechun")


def _without_spec(without: str | Sequence[str] | None) -> list[str] | None:
    """``without`` as a sorted list of names (Facts by their subject), for keys and records."""
    if without is None:
        return None
    items = [without] if isinstance(without, str | Fact) else list(without)
    return sorted({x.subject if isinstance(x, Fact) else str(x) for x in items})


def _without_label(without: str | Sequence[str] | None) -> str:
    spec = _without_spec(without) or []
    label = "+".join(spec)
    if len(label) > 40 or not re.fullmatch(r"[A-Za-z0-9_+-]*", label):  # many subjects: a short stable hash
        label = f"{len(spec)}-subjects-{hashlib.sha1('|'.join(spec).encode()).hexdigest()[:10]}"
    return label


def _entry(preset: str, seed: int, without: str | Sequence[str] | None = None) -> Path:
    oracle = f"-without-{_without_label(without)}" if without is not None else ""
    return cache_root() / "organisms" / f"{preset}-seed{seed}{oracle}-world{WORLD_VERSION}-trainer{TRAINER_VERSION}"


def _entry_ok(entry: Path, preset: str, seed: int, without: str | Sequence[str] | None = None) -> bool:
    """A complete entry (its manifest lists every file, unchanged) of this preset, seed and ``without``."""
    from mechun.io import foreign_files, read_manifest

    manifest = read_manifest(entry)
    if manifest is None or not manifest.get("complete") or foreign_files(entry):
        return False
    try:
        made = json.loads((entry / "training.json").read_text())
    except (OSError, ValueError):
        return False
    config = json.loads(json.dumps(asdict(PRESETS[preset])))  # as training.json holds it (tuples as lists)
    return (made.get("preset") == preset and made.get("seed") == seed and made.get("config") == config
            and made.get("without_spec") == _without_spec(without))


def cached_organism(preset: str = DEFAULT_PRESET, seed: int = 0, progress: bool = True,
                    without: str | Sequence[str] | None = None) -> Path:
    """The organism of ``preset`` and ``seed`` (with ``without``: its retain oracle, :func:`train_organism`),
    trained once per machine and reused (a few milliseconds warm).

    Entries live in :func:`cache_root` keyed by preset, seed, what was left out, :data:`WORLD_VERSION` and
    :data:`TRAINER_VERSION`, are written whole (:func:`mechun.io.atomic_dir`), and are checked against their
    manifest on every use: a corrupt or partial entry is removed and retrained, never used. Concurrent callers wait
    for one training (a file lock).
    """
    import fcntl

    _resolve_preset(preset)
    entry = _entry(preset, seed, without)
    if _entry_ok(entry, preset, seed, without):
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"the organism cache {cache_root()} cannot hold entries ({e.strerror}: {e.filename}); set "
                          "MECHUN_CACHE to a writable directory (default ~/.cache/mechun)") from e
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _entry_ok(entry, preset, seed, without):  # another process trained it while we waited
            return entry
        if entry.exists():
            shutil.rmtree(entry)  # mechun's own cache entry, damaged or partial
        return train_organism(entry, preset=preset, seed=seed, progress=progress, without=without)


def default_organism(seed: int = 0, progress: bool = True) -> Path:
    """The organism a notebook uses: ``$MECHUN_ORGANISM`` if set (the test suite points it at the tiny one), else
    the cached ``main`` organism of ``seed`` if this machine has trained it (``make reproduce`` does), else the
    cached ``tiny`` one (trained in about half a minute on first use)."""
    given = os.environ.get("MECHUN_ORGANISM")
    if given:
        return Path(given)
    if _entry_ok(_entry(DEFAULT_PRESET, seed), DEFAULT_PRESET, seed):
        return _entry(DEFAULT_PRESET, seed)
    return cached_organism("tiny", seed, progress)


def copy_organism(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy an organism checkpoint dir to ``out`` (whole or not at all)."""
    with atomic_dir(out, "organism", overwrite) as tmp:
        for f in Path(src).iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
    return Path(out)
