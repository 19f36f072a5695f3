"""Localized fine-tuning moves only the masked parameters, and does what its mode says."""

import pytest
import torch

import mechun
from mechun.edit import (
    all_components,
    component_mask,
    full_mask,
    localized_finetune,
    mask_from_scores,
    random_mask,
)
from mechun.errors import MechunError
from mechun.evaluate import cloze_accuracy
from mechun.localize import probe_layers
from mechun.models import hf_state_dict


@pytest.fixture()
def fresh(tiny_organism_dir):
    return mechun.load_model(tiny_organism_dir, device="cpu")


def test_masks_match_budgets(tiny_model):
    one = component_mask(tiny_model, [("mlp", 1)])
    assert one.names == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias",
                         "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    scores = {c: float(i) for i, c in enumerate(all_components(tiny_model))}
    m = mask_from_scores(tiny_model, scores, budget=one.n_params)
    assert m.n_params <= one.n_params and len(m.components) >= 1
    r = random_mask(tiny_model, budget=2 * one.n_params, seed=1)
    assert r.n_params == 2 * one.n_params and all(k == "mlp" for k, _ in r.components)
    assert full_mask(tiny_model).n_params > r.n_params


@pytest.mark.parametrize("mode", ["unlearn", "learn"])
def test_unmasked_parameters_stay_bit_identical(fresh, tiny_world, mode):
    facts = tiny_world.facts_of("sports")[:4]
    prompts = [p for p in tiny_world.prompts(facts=facts)]
    answers = [p.answer for p in prompts] if mode == "unlearn" else ["golf"] * len(prompts)
    maintain = [(p.text, p.answer) for p in tiny_world.prompts("people")]
    before = {k: v.clone() for k, v in hf_state_dict(fresh).items()}
    mask = component_mask(fresh, [("mlp", 0), ("attn", 1)])
    localized_finetune(fresh, mask, [p.text for p in prompts], answers, mode=mode, maintain=maintain,
                       lm_texts=tiny_world.filler, steps=40, lr=3e-3)
    after = hf_state_dict(fresh)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= set(mask.names)
    assert all(p.grad is None for p in fresh.parameters())
    acc = cloze_accuracy(fresh, prompts) if mode == "unlearn" else sum(
        mechun.answer_correct(fresh, [p.text for p in prompts], answers).tolist()) / len(prompts)
    assert (acc < 0.5) if mode == "unlearn" else (acc > 0.5)
    assert cloze_accuracy(fresh, tiny_world.prompts("people")) > 0.85  # the maintain set holds


def test_bad_inputs(fresh):
    with pytest.raises(MechunError, match="kind"):
        component_mask(fresh, [("heads", 0)])
    with pytest.raises(MechunError, match="at least one"):
        component_mask(fresh, [])
    m = component_mask(fresh, [("mlp", 0)])
    with pytest.raises(MechunError, match="mode"):
        localized_finetune(fresh, m, ["a"], ["b"], mode="forget")
    m.names = ["no.such.weight"]
    with pytest.raises(MechunError, match="another model"):
        localized_finetune(fresh, m, ["x"], ["y"])


def test_probe_layers_runs_and_fits(tiny_model, tiny_world):
    from mechun.organism.world import relation

    rel = relation("sport")
    facts = tiny_world.facts_of(relation="sport")
    held = {f.subject for f in facts[:3]}
    P, S, Y, T = [], [], [], []
    for f in facts:
        for t in rel.train_templates:
            P.append(t.format(s=f.subject))
            S.append(f.subject)
            Y.append(rel.values.index(f.answer))
            T.append(f.subject not in held)
    res = probe_layers(tiny_model, P, S, Y, T)
    assert len(res.test_accuracy) == tiny_model.cfg.n_layers and res.n_test == 3 * len(rel.train_templates)
    assert max(res.train_accuracy) == 1.0  # the training subjects are separable at some layer
    assert len(res.lookup_layers(2)) == 2


def test_cli_edit(tiny_organism_dir, tiny_world, tmp_path):
    import json

    from conftest import run_cli

    fact = tiny_world.facts_of(relation="sport")[0]
    new = next(v for v in ("golf", "tennis") if v != fact.answer)
    out = json.loads(run_cli("edit", "--model", str(tiny_organism_dir), "--relation", "sport", "--subjects",
                             fact.subject, "--mode", "edit", "--new-answer", new, "--components", "mlp:1",
                             "--steps", "60", "--lr", "3e-3", "--out", str(tmp_path / "e"), "--no-progress").stdout)
    assert out["edited_accuracy"] == 0.0 and out["other_accuracy"] > 0.85  # the old answer is gone, others kept
    edited = mechun.load_model(tmp_path / "e", device="cpu")
    world = mechun.World.load(tmp_path / "e")
    prompts = [p.text for p in world.prompts(facts=[fact])]
    assert mechun.answer_correct(edited, prompts, [new] * len(prompts)).float().mean() > 0.5
