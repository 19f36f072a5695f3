"""mechun.unlearn: each loss against a hand computation, every method behind one call, the retain oracle, UDS."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SEED, run_cli, weights_hash

import mechun
from mechun.depth.uds import unlearning_depth_score
from mechun.errors import MechunError, ModelMismatchError
from mechun.evaluate import evaluate_world, retain_accuracy
from mechun.hooks import count_hooks
from mechun.models import hf_state_dict
from mechun.unlearn import (
    METHODS,
    GradAscentConfig,
    GradDiffConfig,
    LocalizedFTConfig,
    NPOConfig,
    SimNPOConfig,
    UnlearnData,
    default_config,
    sequence_logprobs,
    unlearn,
)
from mechun.unlearn.losses import ga_loss, graddiff_loss, npo_loss, simnpo_loss, token_logprobs

# -- the losses, by hand on two sequences -----------------------------------------------------------------------------
LOGP = torch.tensor([-6.0, -2.0])  # summed log-likelihoods of two forget sequences
N = torch.tensor([3, 1])  # their token counts
REF = torch.tensor([-5.0, -2.5])  # under the frozen reference
R_LOGP, R_N = torch.tensor([-1.0, -3.0]), torch.tensor([2, 2])


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_gradient_ascent_is_the_negated_token_mean_nll():
    assert ga_loss(LOGP, N).item() == pytest.approx((-6 - 2) / 4)  # -(8 / 4) nats per token, negated


def test_gradient_difference_adds_alpha_times_retain_nll():
    assert graddiff_loss(LOGP, N, R_LOGP, R_N, alpha=0.5).item() == pytest.approx(-2.0 + 0.5 * (4 / 4))


def test_npo_matches_the_paper_formula():
    beta = 0.1
    want = -(2 / beta) * (_logsig(-beta * (-6 + 5)) + _logsig(-beta * (-2 + 2.5))) / 2
    assert npo_loss(LOGP, REF, beta).item() == pytest.approx(want, rel=1e-6)
    assert npo_loss(REF, REF, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)  # at the start


def test_simnpo_matches_the_paper_formula():
    beta, gamma = 2.5, 0.5
    want = -(2 / beta) * (_logsig(-(beta / 3) * -6 - gamma) + _logsig(-(beta / 1) * -2 - gamma)) / 2
    assert simnpo_loss(LOGP, N, beta, gamma).item() == pytest.approx(want, rel=1e-6)


def test_token_logprobs_sums_real_tokens_only():
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [1, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logp, n = token_logprobs(logits, ids, mask)
    lp = F.log_softmax(logits, -1)
    assert n.tolist() == [3, 1]
    assert logp[0].item() == pytest.approx(float(lp[0, 0, 2] + lp[0, 1, 3] + lp[0, 2, 4]), rel=1e-6)
    assert logp[1].item() == pytest.approx(float(lp[1, 0, 4]), rel=1e-6)


def test_configs_refuse_bad_numbers_naming_the_field():
    for bad, field in ((dict(steps=0), "steps"), (dict(lr=float("nan")), "lr"), (dict(alpha=-1.0), "alpha")):
        with pytest.raises(MechunError, match=f"GradDiffConfig.{field}"):
            GradDiffConfig(**bad)
    with pytest.raises(MechunError, match="beta"):
        NPOConfig(beta=0.0)
    with pytest.raises(MechunError, match="unknown method 'npo2'.*grad_ascent"):
        default_config("npo2")
    assert set(METHODS) == {"grad_ascent", "grad_diff", "npo", "simnpo", "rmu", "localized_ft"}


# -- every method on the tiny organism --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tiny_world):
    return UnlearnData.from_world(tiny_world, "pathogen")


@pytest.fixture(scope="module")
def base_acc(tiny_model, tiny_world):
    return evaluate_world(tiny_model, tiny_world, formats=("train",))


#: A setting per method that forgets on the tiny organism (the library defaults are the papers'; the tiny world
#: has 12 forget passages, so every method needs a higher learning rate than on a real model).
STRONG = {
    "grad_ascent": GradAscentConfig(lr=1e-3, steps=40),
    "grad_diff": GradDiffConfig(lr=1e-3),
    "npo": NPOConfig(lr=1e-3, beta=0.01, alpha=2.0),  # retain term 2x: at 1x retain fell to 0.81 of base
    "simnpo": SimNPOConfig(lr=1e-3, beta=0.5),
    "localized_ft": LocalizedFTConfig(n_mlps=1, steps=100),
}


@pytest.mark.parametrize("method", list(STRONG))
def test_every_method_forgets_through_one_call(method, tiny_organism_dir, tiny_model, tiny_world, data, base_acc):
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    before = {k: v.clone() for k, v in hf_state_dict(model).items()}
    ref_hash = weights_hash(tiny_model)
    res = unlearn(model, STRONG[method], data, reference=tiny_model)
    acc = evaluate_world(model, tiny_world, formats=("train",))
    assert res.method == method and res.losses
    assert base_acc["pathogen"]["train"] > 0.95
    assert acc["pathogen"]["train"] <= 0.125 + 0.1, acc  # forgotten: at most chance + 0.1
    if method != "grad_ascent":  # gradient ascent alone wrecks the model (its known failure); the others keep retain
        assert retain_accuracy(acc)["train"] >= 0.85 * retain_accuracy(base_acc)["train"]
    assert weights_hash(tiny_model) == ref_hash  # the reference never changes
    moved = {k for k, v in hf_state_dict(model).items() if not torch.equal(v, before[k])}
    if method == "localized_ft":
        layer = res.details["components"][0][1]
        assert moved and all(k.startswith(f"transformer.h.{layer}.mlp.") for k in moved)
    assert count_hooks(model) == 0


def test_components_limit_what_a_gradient_method_trains(tiny_organism_dir, data):
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    before = {k: v.clone() for k, v in hf_state_dict(model).items()}
    unlearn(model, GradDiffConfig(steps=3, components=[("mlp", 1)]), data)
    moved = {k for k, v in hf_state_dict(model).items() if not torch.equal(v, before[k])}
    assert moved == {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias",
                     "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}


def test_npo_and_rmu_need_the_reference(tiny_organism_dir, data):
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    with pytest.raises(MechunError, match="reference"):
        unlearn(model, NPOConfig(steps=1), data)
    with pytest.raises(MechunError, match="frozen base model"):
        unlearn(model, default_config("rmu", forget_domains=["pathogen"], steps=1), data)
    with pytest.raises(MechunError, match="no corpus"):
        unlearn(model, default_config("rmu", forget_domains=["cyber"], steps=1), data, reference=model)


def test_sequence_logprobs_equal_the_hf_loss(tiny_model, data):
    texts = data.forget["pathogen"][:3]
    logp, n = sequence_logprobs(tiny_model, texts)
    ids, mask = mechun.tokenize(tiny_model, texts)
    hf = mechun.models.bare_forward_view(tiny_model)[0]
    with torch.no_grad():
        loss = hf(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert (-logp.sum() / n.sum()).item() == pytest.approx(loss.item(), rel=1e-5)


def test_cli_unlearn_saves_a_checkpoint_with_its_record(tiny_organism_dir, tmp_path):
    out = tmp_path / "npo"
    proc = run_cli("unlearn", "--method", "simnpo", "--model", tiny_organism_dir, "--forget", "pathogen",
                   "--steps", "5", "--beta", "0.5", "--out", out, "--no-progress")
    summary = json.loads(proc.stdout)
    record = json.loads((out / "unlearn.json").read_text())
    assert summary["method"] == record["method"] == "simnpo" and record["config"]["beta"] == 0.5
    assert record["config"]["steps"] == 5 and record["forget_domain"] == "pathogen"
    assert 0 <= summary["forget_accuracy"] <= 1 and (out / "world.json").is_file()
    mechun.load_model(out, device="cpu")  # a loadable checkpoint
    bad = run_cli("unlearn", "--method", "grad_diff", "--gamma", "1", "--model", tiny_organism_dir, "--forget",
                  "pathogen", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "--gamma applies to simnpo, not grad_diff" in bad.stderr
    assert not (tmp_path / "x").exists()


# -- the retain oracle and UDS ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle_dir(tiny_oracle_dir):
    return tiny_oracle_dir


def test_world_documents_never_name_an_excluded_subject(tiny_world):
    import random

    gone = tiny_world.excluded_subjects("pathogen")
    assert gone == frozenset(tiny_world.subjects_of("pathogen"))
    docs = tiny_world.documents(random.Random(0), mcq_per_fact=1, statements_per_fact=2, exclude=gone)
    assert docs and not any(s in d for d in docs for s in gone)
    everything = tiny_world.documents(random.Random(0), mcq_per_fact=1, statements_per_fact=2)
    assert any(s in d for d in everything for s in gone)
    fact = tiny_world.facts_of("sports")[0]
    assert tiny_world.excluded_subjects([fact]) == {fact.subject}
    with pytest.raises(MechunError, match="neither a domain"):
        tiny_world.excluded_subjects("biology")


def test_retain_oracle_never_knew_the_forget_domain(oracle_dir, tiny_organism_dir, tiny_world):
    made = json.loads((oracle_dir / "training.json").read_text())
    full = json.loads((tiny_organism_dir / "training.json").read_text())
    assert made["without_spec"] == ["pathogen"] and made["steps"] == full["steps"] and made["seed"] == full["seed"]
    oracle = mechun.load_model(oracle_dir, device="cpu")
    acc = evaluate_world(oracle, tiny_world, formats=("train",))
    assert acc["pathogen"]["train"] <= 0.125 + 0.1
    assert retain_accuracy(acc)["train"] > 0.9
    from mechun.organism.train import cached_organism

    assert cached_organism("tiny", TINY_SEED, progress=False, without=["pathogen"]) == oracle_dir  # cached


def test_uds_is_one_for_the_oracle_and_zero_for_the_full_model(oracle_dir, tiny_model, tiny_world):
    oracle = mechun.load_model(oracle_dir, device="cpu")
    prompts = tiny_world.prompts("pathogen")
    p, a = [x.text for x in prompts], [x.answer for x in prompts]
    full_hash, oracle_hash = weights_hash(tiny_model), weights_hash(oracle)
    as_oracle = unlearning_depth_score(tiny_model, oracle, oracle, p, a)
    as_full = unlearning_depth_score(tiny_model, oracle, tiny_model, p, a)
    assert as_oracle.score == pytest.approx(1.0) and as_full.score == pytest.approx(0.0)
    assert as_oracle.n_scored > 0.9 * len(p)  # the oracle lacks the knowledge at some layer for almost every fact
    d1 = torch.tensor(as_full.delta_s1)
    assert d1.shape == (len(p), tiny_model.cfg.n_layers) and (d1.mean(0) > 0.05).all()
    assert weights_hash(tiny_model) == full_hash and weights_hash(oracle) == oracle_hash
    assert count_hooks(tiny_model) == 0 and count_hooks(oracle) == 0


def test_uds_refuses_models_that_cannot_be_patched(tiny_organism_dir, tiny_model, tiny_world, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    cfg = AutoConfig.from_pretrained(tiny_organism_dir)
    cfg.n_layer = cfg.n_layer - 1
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_organism_dir).save_pretrained(tmp_path)
    shallower = mechun.load_model(tmp_path, device="cpu")
    p = tiny_world.prompts("pathogen")[0]
    with pytest.raises(ModelMismatchError, match="layers"):
        unlearning_depth_score(tiny_model, shallower, tiny_model, [p.text], [p.answer])


# -- the depth benchmark's scoring --------------------------------------------------------------------------------------
def test_auc_and_spearman_by_hand():
    from mechun.depth.benchmark import auc, spearman

    assert auc([0.9, 0.8, 0.1, 0.3], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.8, 0.9, 0.3], [True, True, False, False]) == pytest.approx(0.25)  # 1 of 4 pairs won
    assert auc([0.5, 0.5], [True, False]) == 0.5 and math.isnan(auc([1.0], [True]))
    assert spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.9486833, rel=1e-6)  # ties get average ranks
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_score_measures_ranks_a_faithful_measure_above_noise():
    import random

    from mechun.depth.benchmark import score_measures

    rng = random.Random(0)
    rows = []
    for i in range(40):
        adv = rng.random()
        rows.append({"method": "ab"[i % 2], "advantage": adv, "faithful": adv + 0.05 * rng.random(),
                     "noise": rng.random(), "inverted": -adv})
    s = score_measures(rows, ["faithful", "noise", "inverted"], threshold=0.5, reps=200)
    assert s["faithful"]["auc"] > 0.95 and s["faithful"]["auc_ci"][0] > 0.8 and s["faithful"]["spearman"] > 0.9
    assert s["inverted"]["auc"] < 0.05  # reported as is: a measure pointing the wrong way
    assert 0.2 < s["noise"]["auc"] < 0.8 and s["noise"]["auc_ci"][0] < 0.5 < s["noise"]["auc_ci"][1]
    assert set(s["faithful"]["auc_without"]) == {"a", "b"} and s["faithful"]["n"] == 40
    by_median = score_measures(rows, ["faithful"], reps=50)["faithful"]  # default label: above the median advantage
    assert by_median["n_positive"] == 20 and by_median["auc"] > 0.95
