"""The model organism: a deterministic world, an HF tokenizer, a trainer, and the acceptance command."""

import collections
import dataclasses
import json
import random
import re

import pytest
import torch
from conftest import TINY_SEED, run_cli

from mechun import World
from mechun.errors import MechunError, OutputError
from mechun.organism.tokenizer import build_tokenizer
from mechun.organism.train import train_organism
from mechun.organism.world import DOMAINS, LETTERS, RELATIONS, relation, relations


def test_world_is_deterministic_and_seed_dependent():
    a, b, c = World.generate(5, 6), World.generate(5, 6), World.generate(6, 6)
    assert a.to_json() == b.to_json()
    assert a.facts != c.facts


def test_world_shape():
    """Issue 12's world: 6 domains (2 forget, 4 retain), 3 relations each with 8-16 values, some answers of two
    tokens, 12 trained and 4 held-out templates per relation, two-word names from the domain's own morphemes."""
    w = World.generate(0, 64)
    assert sum(k == "forget" for k in DOMAINS.values()) >= 2 and sum(k == "retain" for k in DOMAINS.values()) >= 4
    assert all(len(relations(d)) >= 3 for d in DOMAINS)
    assert all(8 <= len(r.values) <= 16 for r in RELATIONS)
    assert any(len(v.split()) >= 2 for r in RELATIONS for v in r.values)
    assert all(len(r.train_templates) >= 12 and len(r.paraphrase_templates) >= 4 for r in RELATIONS)
    assert all(len(name.split()) >= 2 for name in w.subjects)  # multi-token names
    assert len(w.facts) == 64 * sum(len(relations(d)) for d in DOMAINS)
    assert len(set(w.subjects)) == len(w.subjects)
    # each domain's names share no word with another domain's: a domain has a vocabulary of its own
    words = {d: {x for s in w.subjects_of(d) for x in s.split()} for d in DOMAINS}
    assert all(not (words[a] & words[b]) for a in DOMAINS for b in DOMAINS if a < b)
    # values spread evenly: every value of a relation has 8 subjects
    for r in RELATIONS:
        counts = [sum(f.answer == v for f in w.facts_of(relation=r.name)) for v in r.values]
        assert counts == [64 // len(r.values)] * len(r.values)


def test_held_out_formats_never_appear_in_training():
    """Paraphrase templates never appear in any training document; MCQ is trained on half the subjects and tested
    on the other half; the unlearning corpora are passages."""
    import random

    w = World.generate(0, 8)
    docs = w.documents(random.Random(0), passages_per_subject=3, mcq_per_fact=4, statements_per_fact=3)
    text = " || ".join(docs)
    for r in RELATIONS:
        for t in r.paraphrase_templates:
            for s in w.subjects_of(r.domain):
                assert t.format(s=s) not in text
    mcq_docs = [d for d in docs if d.startswith("question :")]
    trained = set(w.mcq_subjects)
    assert mcq_docs and all(any(s in d for s in trained) for d in mcq_docs)
    assert not any(s in d for d in mcq_docs for s in set(w.subjects) - trained)
    assert {q.fact.subject for q in w.mcq()} == set(w.subjects) - trained
    forget, retain = w.corpora(["pathogen"])
    assert all(len(t.split(" . ")) >= 3 for t in forget["pathogen"])  # multi-sentence passages
    assert not any(s in t for t in retain for s in w.subjects_of("pathogen"))


def test_mcq_format():
    w = World.generate(0, 6)
    for q in w.mcq("pathogen"):
        assert len(q.choices) == 4 and len(set(q.choices)) == 4
        assert q.choices[q.answer_index] == q.fact.answer and q.answer in LETTERS
        opts = " , ".join(f"{c} {letter}" for c, letter in zip(q.choices, LETTERS, strict=True))
        assert q.question == f"{q.fact.subject} {relation(q.fact.relation).phrases[0]}"
        assert q.text == f"question : {q.question} what ? {opts} answer : {q.question}"  # the answer restates it
        assert set(q.choices) == {q.fact.answer, *w.distractors(q.fact)}  # fixed options per fact
    # trained MCQ texts answer by restating the stem, naming the option, then the letter that follows it among
    # the options
    texts = w.mcq_training(random.Random(0), per_fact=3)
    assert len(texts) == 3 * len(w.mcq_facts(trained=True))
    for text in texts:
        prompt, answer = text.split(" answer : ")
        stem = prompt.removeprefix("question : ").split(" what ? ")[0]
        value, letter = answer.removeprefix(stem + " ").rsplit(" ", 1)
        assert letter in LETTERS and f" {value} {letter} " in f"{prompt} "
        assert value in {f.answer for f in w.facts if f.subject in stem}


def test_epochs_hold_repeated_sequences(tiny_world, tiny_organism_dir):
    """The trainer mixes repeated random sequences (``x x``) into each epoch: induction-head food. Their lengths
    vary, so that no fixed-offset copy solves them."""
    from transformers import AutoTokenizer

    from mechun.organism.train import PRESETS, _epoch_documents, _repeat_words

    tok = AutoTokenizer.from_pretrained(tiny_organism_dir)
    preset = dataclasses.replace(PRESETS["tiny"], repeats_per_epoch=40, repeat_lens=(3, 9))
    words = _repeat_words(tiny_world, tok, preset)
    docs = _epoch_documents(tiny_world, tok, preset, 0, 0, words)
    world_docs = _epoch_documents(tiny_world, tok, dataclasses.replace(preset, repeats_per_epoch=0), 0, 0, words)
    extra = collections.Counter(map(tuple, docs)) - collections.Counter(map(tuple, world_docs))
    repeats = [list(d) for d in extra.elements()]
    assert len(repeats) == preset.repeats_per_epoch
    assert all(len(d) % 2 == 1 and d[1:len(d) // 2 + 1] == d[len(d) // 2 + 1:] for d in repeats)
    assert {len(d) // 2 for d in repeats} <= set(range(3, 10)) and len({len(d) for d in repeats}) >= 4
    assert not set(tok.all_special_ids) & {i for d in repeats for i in d[1:]}


def test_repeats_follow_their_schedule_and_can_avoid_fact_words(tiny_world, tiny_organism_dir):
    """``repeat_epochs`` epochs carry ``repeats_per_epoch`` repeats, later ones ``repeats_after``; with
    ``repeats_avoid_facts`` no repeat holds a word of a subject's name or of a value (words that do occur otherwise)."""
    from transformers import AutoTokenizer

    from mechun.organism.train import PRESETS, _epoch_documents, _repeat_words

    tok = AutoTokenizer.from_pretrained(tiny_organism_dir)
    preset = dataclasses.replace(PRESETS["tiny"], repeats_per_epoch=40, repeat_epochs=2, repeats_after=7)
    avoiding = dataclasses.replace(preset, repeats_avoid_facts=True)

    def repeats(p, epoch):
        words = _repeat_words(tiny_world, tok, p)
        world_docs = _epoch_documents(tiny_world, tok, dataclasses.replace(p, repeats_per_epoch=0, repeats_after=0),
                                      0, epoch, words)
        extra = collections.Counter(map(tuple, _epoch_documents(tiny_world, tok, p, 0, epoch, words)))
        return list((extra - collections.Counter(map(tuple, world_docs))).elements())

    assert [len(repeats(preset, e)) for e in (0, 1, 2, 5)] == [40, 40, 7, 7]
    fact_words = tiny_world.name_and_value_words()
    assert {next(iter(tiny_world.subjects)).split()[0], "fever"} <= fact_words  # a name's word, a value's word
    fact_ids = set(tok.convert_tokens_to_ids(sorted(fact_words)))
    drawn = [{i for d in repeats(p, 0) for i in d[1:]} for p in (preset, avoiding)]
    assert drawn[0] & fact_ids and not drawn[1] & fact_ids
    assert len(drawn[1]) > 20  # still random sequences, over the words left


def test_pack_weights_the_mcq_answer_and_its_letter(tiny_world, tiny_organism_dir):
    """In packed rows, an answered question's named option (first token) and letter (last token) carry their
    preset weights; every other token of a document weighs 1, a document's first token and padding 0."""
    from transformers import AutoTokenizer

    from mechun.organism.train import MCQMarks, _pack

    tok = AutoTokenizer.from_pretrained(tiny_organism_dir)
    mcq = tiny_world.mcq_training(random.Random(0), per_fact=1)[0]
    docs = tok([tiny_world.filler[0], mcq, tiny_world.filler[1]])["input_ids"]
    marks = MCQMarks(*tok.convert_tokens_to_ids(["question", ":", "what", "answer"]))
    ids, weight, pos, _ = _pack(docs, 128, tok.pad_token_id, marks, answer_weight=3.0, letter_weight=7.0)
    start = len(docs[0])
    q = weight[0, start:start + len(docs[1])]
    named = len(tok(mcq.rsplit(" ", 2)[0])["input_ids"])  # the named option's first token (one-token options here)
    assert tok.decode(docs[1][named:]) == " ".join(mcq.split()[-2:])
    assert q[named] == 3.0 and q[-1] == 7.0 and q[0] == 0.0
    assert (q[1:named] == 1).all() and (q[named + 1:-1] == 1).all()
    plain = weight[0, :start + len(docs[1]) + len(docs[2])]
    others = torch.cat([plain[1:start], plain[start + len(docs[1]) + 1:]])
    assert (others == 1).all() and (weight[0, start + len(docs[1]) + len(docs[2]):] == 0).all()


def test_neighbourhood_excludes_subject():
    w = World.generate(0, 6)
    fact = w.facts[0]
    nb = w.neighbourhood(fact)
    assert len(nb) == 5 and all(p.fact.subject != fact.subject and p.fact.relation == fact.relation for p in nb)


def test_bad_world_inputs(tmp_path):
    with pytest.raises(MechunError, match="subjects_per_domain"):
        World.generate(0, 3)
    with pytest.raises(MechunError, match="unknown domain"):
        World.generate(0, 4).prompts("chemistry")
    with pytest.raises(MechunError, match="world.json"):
        World.load(tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(MechunError, match="missing or bad field"):
        World.load(tmp_path)
    old = {**World.generate(0, 4).to_json(), "version": 1}  # an organism trained by an earlier mechun
    (tmp_path / "world.json").write_text(json.dumps(old))
    with pytest.raises(MechunError, match="version-1 world; this mechun reads version 3"):
        World.load(tmp_path)


def test_tokenizer_roundtrip_and_hf_format(tmp_path):
    from transformers import AutoTokenizer

    w = World.generate(0, 6)
    tok = build_tokenizer(w.vocabulary())
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = w.training_texts()[0]
    ids = again(text)["input_ids"]
    assert ids[0] == again.bos_token_id and again.unk_token_id not in ids
    assert again.decode(ids, skip_special_tokens=True).replace(" .", ".") == text.replace(" .", ".")


def test_training_is_deterministic(tmp_path):
    a = train_organism(tmp_path / "a", "tiny", seed=3, progress=False, steps=15)
    b = train_organism(tmp_path / "b", "tiny", seed=3, progress=False, steps=15)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for f in ("config.json", "tokenizer.json", "world.json", "training.json"):
        assert (a / f).is_file()


def test_training_refuses_nonempty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(OutputError, match="not empty"):
        train_organism(tmp_path / "x", "tiny", steps=1, progress=False)
    with pytest.raises(MechunError, match="unknown preset"):
        train_organism(tmp_path / "y", "huge", progress=False)
    assert not (tmp_path / "y").exists()


def test_acceptance_tiny_organism_knows_its_facts(tiny_organism_dir):
    """`mechun organism train --preset tiny --seed 123 --out D && mechun eval --model D --json`."""
    proc = run_cli("eval", "--model", str(tiny_organism_dir), "--json")
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert re.search(rf"evaluating: 100%.*\b{len(DOMAINS)}/{len(DOMAINS)} ", proc.stderr)  # a bar, on stderr
    assert result["model"] == str(tiny_organism_dir)
    assert set(result["accuracy"]) == set(DOMAINS)
    for domain, acc in result["accuracy"].items():
        assert set(acc) == {"train", "paraphrase", "mcq", "mcq_all_orders"}
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in acc.values())
        assert acc["train"] >= 0.95, (domain, acc)


def test_cached_organism_is_trained_once_and_a_damaged_entry_is_retrained(tmp_path, monkeypatch):
    """The per-machine cache: warm reuse without training; a changed file or a missing manifest is never used."""

    import mechun.organism.train as train

    monkeypatch.setenv("MECHUN_CACHE", str(tmp_path / "cache"))
    trainings = []

    def short(out, **kw):
        trainings.append(out)
        return train_organism(out, **{**kw, "steps": 5})

    monkeypatch.setattr(train, "train_organism", short)
    entry = train.cached_organism("tiny", 7, progress=False)
    assert entry.parent == tmp_path / "cache" / "organisms" and len(trainings) == 1
    assert json.loads((entry / "training.json").read_text())["trainer_version"] == train.TRAINER_VERSION
    assert train.cached_organism("tiny", 7, progress=False) == entry and len(trainings) == 1  # warm: no training
    weights = (entry / "model.safetensors").read_bytes()
    (entry / "model.safetensors").write_bytes(weights[:-8] + b"\0" * 8)  # same size, other bytes, newer mtime
    assert train.cached_organism("tiny", 7, progress=False) == entry and len(trainings) == 2
    assert (entry / "model.safetensors").read_bytes() == weights  # deterministic retraining
    (entry / ".mechun-manifest.json").unlink()  # a partial entry
    assert train.cached_organism("tiny", 7, progress=False) == entry and len(trainings) == 3


def test_organism_train_copies_the_cached_organism(tiny_organism_dir):
    """The session's organism came from `mechun organism train`: a copy of the per-machine cache entry."""
    from mechun.organism.train import _entry

    entry = _entry("tiny", TINY_SEED)  # not a glob: the retain oracles' entries (tiny-seed0-without-...) match one
    assert entry.is_dir()
    for f in ("model.safetensors", "world.json", "training.json", "tokenizer.json"):
        assert (tiny_organism_dir / f).read_bytes() == (entry / f).read_bytes()


def test_bad_preset_is_refused_before_anything_is_written(tmp_path):
    """A preset whose repeats cannot be drawn or packed, or with a non-positive weight, fails in one line at
    construction: train_organism never starts and writes nothing."""
    from mechun.organism.train import PRESETS

    with pytest.raises(MechunError, match=r"repeat_lens=\(10, 5\) must be"):
        dataclasses.replace(PRESETS["tiny"], repeat_lens=(10, 5))
    with pytest.raises(MechunError, match="repeat_lens=.*seq_len=64"):
        dataclasses.replace(PRESETS["tiny"], repeat_lens=(4, 40))
    with pytest.raises(MechunError, match="letter_weight=-1.0 must be positive"):
        dataclasses.replace(PRESETS["main"], letter_weight=-1.0)
    with pytest.raises(MechunError, match="repeats_after=-1 must not be negative"):
        dataclasses.replace(PRESETS["main"], repeats_after=-1)
    assert list(tmp_path.iterdir()) == []


def test_repeats_longer_than_their_words_are_refused_before_training(tmp_path, monkeypatch):
    """Repeats draw distinct words: a ``repeat_lens`` beyond the words allowed (fact-free ones here) fails in one
    line before any model is built, and nothing is written."""
    import mechun.organism.train as train

    monkeypatch.setattr(train, "_build_model", lambda *a: pytest.fail("a model was built"))
    bad = dataclasses.replace(train.PRESETS["tiny"], seq_len=1024, repeat_lens=(4, 400), repeats_per_epoch=10,
                              repeats_avoid_facts=True)
    with pytest.raises(MechunError, match=r"repeat_lens=\(4, 400\) draws up to 400 distinct words, but only \d+ "
                                          r"are allowed in repeats \(repeats_avoid_facts=True\); lower repeat_lens"):
        train.train_organism(tmp_path / "organism", preset=bad, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []
