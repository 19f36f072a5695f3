"""Specificity and robustness metrics: MCQ over every option order, neighbourhood score/magnitude, NKL."""

import dataclasses
import math

import pytest
import torch

import mechun
from mechun.errors import MechunError, ModelMismatchError
from mechun.evaluate import (
    answer_logprob,
    dynamic_prompts,
    kl_divergence,
    letter_token_ids,
    mcq_correct,
    mcq_permutation_scores,
    neighbourhood_scores,
    next_token_logprobs,
    nkl,
    permute_mcq,
    robustly_known,
)
from mechun.models import tokenize
from mechun.organism.world import LETTERS, MCQ, mmlu_text


def test_permute_mcq_covers_every_order_and_tracks_the_answer(tiny_world):
    q = tiny_world.mcq("sports", seed=1)[0]
    perms = permute_mcq(q)
    assert len(perms) == 24 and perms[0].text == q.text
    assert len({p.choices for p in perms}) == 24
    for p in perms:
        assert p.choices[p.answer_index] == q.choices[q.answer_index]
        assert sorted(p.choices) == sorted(q.choices)
        assert f"{q.fact.answer} {LETTERS[p.answer_index]}" in p.text
    mm = MCQ(mmlu_text("Which?", ("w", "x", "y", "z")), ("w", "x", "y", "z"), 2, None, "Which?", "mmlu")
    assert all(p.text.endswith("Answer:") and p.choices[p.answer_index] == "y" for p in permute_mcq(mm))
    with pytest.raises(MechunError, match="stem"):
        permute_mcq(MCQ("q A . a B . b C . c D . d answer :", ("a", "b", "c", "d"), 0))


def test_organism_mcq_is_the_letter_after_the_likeliest_option(tiny_model, tiny_world):
    """The organism answers by naming an option and then its letter: recomputed here from plain forwards."""
    qs = [p for q in tiny_world.mcq("music", seed=1)[:3] for p in permute_mcq(q)[:8]]
    expected = []
    for q in qs:
        logps = answer_logprob(tiny_model, [q.text] * len(q.choices), list(q.choices))
        named = q.choices[int(logps.argmax())]
        ids, mask = tokenize(tiny_model, [f"{q.text} {named}"])
        with torch.inference_mode():
            last = tiny_model(ids, attention_mask=mask)[0, int(mask.sum()) - 1]
        letters = letter_token_ids(tiny_model, f"{q.text} {named}")
        expected.append(int(last[letters].argmax()) == q.answer_index)
    assert mcq_correct(tiny_model, qs).tolist() == expected
    # a question of a letter-first style in the same call is scored by the letter at its last position
    q = qs[2]
    mm = MCQ(q.text, q.choices, q.answer_index, q.fact, q.question, "mmlu")
    ids, mask = tokenize(tiny_model, [q.text])
    with torch.inference_mode():
        last = tiny_model(ids, attention_mask=mask)[0, int(mask.sum()) - 1]
    letter_first = int(last[letter_token_ids(tiny_model, q.text)].argmax()) == q.answer_index
    assert mcq_correct(tiny_model, [qs[0], mm, qs[1]]).tolist() == [expected[0], letter_first, expected[1]]


def test_a_bad_mcq_is_refused_when_made_and_an_empty_list_when_scored(tiny_model, tiny_world):
    q = tiny_world.mcq("music", seed=1)[0]
    for kwargs, message in (({"style": "wmdp"}, "unknown style 'wmdp'"),
                            ({"choices": q.choices[:3], "answer_index": 0}, "has 3 options; mechun's MCQ formats take exactly 4"),
                            ({"answer_index": 4}, "answer_index 4; use 0 to 3")):
        with pytest.raises(MechunError, match=message):
            dataclasses.replace(q, **kwargs)
    for score in (mcq_correct, mcq_permutation_scores):
        with pytest.raises(MechunError, match="non-empty list"):
            score(tiny_model, [])


def test_permutation_scores_agree_with_single_order_scoring(tiny_model, tiny_world):
    qs = tiny_world.mcq("people", seed=1)[:6]
    scores = mcq_permutation_scores(tiny_model, qs)
    for i, q in enumerate(qs):
        right = mcq_correct(tiny_model, permute_mcq(q))
        assert math.isclose(float(scores.fraction[i]), float(right.float().mean()))
        assert bool(scores.all_correct[i]) == bool(right.all())
    kept = robustly_known(tiny_model, qs)
    assert kept == [q for q, k in zip(qs, scores.all_correct.tolist(), strict=True) if k]
    assert scores.robust_accuracy <= scores.accuracy


def test_kl_is_the_true_kl():
    torch.manual_seed(0)
    logp, logq = torch.randn(3, 50).log_softmax(-1), torch.randn(3, 50).log_softmax(-1)
    ours = kl_divergence(logp, logq)
    ref = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ours, ref, atol=1e-6)
    # CounterFact+'s number is this divided by the vocabulary size; ours is not
    assert not torch.allclose(ours, ref / 50)
    assert torch.allclose(kl_divergence(logp, logp), torch.zeros(3))
    with pytest.raises(ModelMismatchError):
        kl_divergence(logp, logq[:, :40])


def test_nkl_zero_for_the_same_model_and_positive_under_an_intervention(tiny_model, tiny_world):
    prompts = [p.text for p in tiny_world.prompts("sports")[:8]]
    assert float(nkl(tiny_model, tiny_model, prompts).abs().max()) < 1e-6
    base = next_token_logprobs(tiny_model, prompts)
    d = torch.randn(tiny_model.cfg.d_model)
    with mechun.add_direction(tiny_model, d * 20, layers=[1]):
        steered = next_token_logprobs(tiny_model, prompts)
    assert float(kl_divergence(steered, base).mean()) > 0.01


def test_neighbourhood_scores_match_a_hand_computation(tiny_model, tiny_world):
    fact = tiny_world.facts_of(relation="sport")[0]
    new = next(v for v in ("tennis", "golf", "boxing") if v != fact.answer)
    neigh = [p for p in tiny_world.neighbourhood(fact) if p.answer != new]  # as edit-specificity picks them
    texts, trues = [p.text for p in neigh], [p.answer for p in neigh]
    static = neighbourhood_scores(tiny_model, texts, trues, new)
    p_true = answer_logprob(tiny_model, texts, trues).exp()
    p_new = answer_logprob(tiny_model, texts, [new] * len(texts)).exp()  # one-token objects: geometric mean = p
    assert torch.allclose(static.p_true, p_true, atol=1e-5)
    assert static.score == pytest.approx(float((p_true > p_new).float().mean()))
    assert static.magnitude == pytest.approx(float((p_true - p_new).mean()), abs=1e-5)
    assert static.score > 0.8  # the unedited organism knows its neighbours
    statement = tiny_world.statement(fact, new)
    assert dynamic_prompts(texts, statement)[0] == f"{statement} {texts[0]}"
    dyn = neighbourhood_scores(tiny_model, texts, trues, new, edit_statement=statement)
    p_dyn = answer_logprob(tiny_model, dynamic_prompts(texts, statement), trues).exp()
    assert torch.allclose(dyn.p_true, p_dyn, atol=1e-5)
    with pytest.raises(MechunError):
        neighbourhood_scores(tiny_model, texts, trues[:-1], new)


def test_localized_edit_changes_the_fact_and_restores_nothing_else(tiny_organism_dir, tiny_world):
    """The edit-specificity analysis' building blocks: one localized edit is effective, and the measurement
    code reports static and dynamic neighbourhood scores for it."""
    from mechun.reproduce import load_analysis

    es = load_analysis("edit-specificity")
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    (fact, new), = es.pick_edits(tiny_world, 1, seed=0)
    before = es.measure(model, tiny_world, fact, new)
    info = es.edit_once(model, tiny_world, fact, new, steps=30, seed=0)
    after = es.measure(model, tiny_world, fact, new)
    assert len(info["components"]) == 1 and info["components"][0][0] == "mlp"
    assert before["efficacy"] == 0.0 and after["efficacy"] >= 0.75
    for m in (before, after):
        assert 0.0 <= m["ns_static"] <= 1.0 and 0.0 <= m["ns_dynamic"] <= 1.0
    assert before["ns_static"] > 0.8


def test_counterfact_records_feed_the_specificity_metrics(tiny_model, tiny_world, tmp_path):
    """A CounterFact-schema file, written in the organism's vocabulary, loaded and scored end to end."""
    import json

    from mechun.data import load_counterfact
    from mechun.evaluate import counterfact_specificity

    fact = tiny_world.facts_of(relation="sport")[0]
    new = next(v for v in ("tennis", "golf", "boxing") if v != fact.answer)
    others = [f for f in tiny_world.facts_of(relation="sport") if f.answer == fact.answer and f != fact]
    neigh = [f"{o.subject} plays the sport of" for o in others] or [f"{fact.subject} plays the sport of"]
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": fact.subject,
                                               "target_new": {"str": new}, "target_true": {"str": fact.answer},
                                               "relation_id": "P641"},
           "neighborhood_prompts": neigh, "paraphrase_prompts": []}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    (case,) = load_counterfact(path)
    r = counterfact_specificity(tiny_model, tiny_model, case)
    assert r["nkl_static"] < 1e-6 and r["nkl_dynamic"] < 1e-6  # the same model on both sides
    assert r["edited_static"] == r["unedited_static"]
    direct = neighbourhood_scores(tiny_model, neigh, [fact.answer] * len(neigh), new, case.edit_statement)
    assert r["edited_dynamic"]["score"] == direct.score
