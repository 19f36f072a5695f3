"""Representation checks (CKA, held-out-subject probes) and the unlearning depth card."""

import json
import math

import pytest
import torch
from conftest import run_cli, warm, weights_hash

import mechun
from mechun.depth import (
    DepthCard,
    DepthConfig,
    RelearningSection,
    Skipped,
    aggregate_cards,
    depth_card,
    summary_row,
    verdict,
)
from mechun.errors import MechunError
from mechun.models import model_fingerprint
from mechun.representation import (
    linear_cka,
    normalize_rows,
    probe_recoverability,
    subject_fold_ids,
    subject_folds,
)


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-6)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2
    with pytest.raises(MechunError, match="same inputs"):
        linear_cka(x, x[:10])


def test_subject_folds_never_share_a_subject():
    subjects = ["a", "a", "b", "c", "c", "d"]
    fold = subject_folds(subjects, seed=1)
    assert {s for s, f in zip(subjects, fold, strict=True) if f}.isdisjoint({s for s, f in zip(subjects, fold, strict=True) if not f})
    with pytest.raises(MechunError):
        subject_folds(["a", "a"])


def test_k_folds_partition_the_subjects_into_near_equal_blocks():
    subjects = [f"s{i}" for i in range(19) for _ in range(3)]  # three prompts per subject
    ids = subject_fold_ids(subjects, n_folds=8, seed=3)
    fold_of = {}
    for s, f in zip(subjects, ids, strict=True):
        assert fold_of.setdefault(s, f) == f  # a subject never straddles two folds
    sizes = [sum(f == k for f in fold_of.values()) for k in range(8)]
    assert sorted(set(ids)) == list(range(8)) and max(sizes) - min(sizes) <= 1 and sum(sizes) == 19
    assert subject_fold_ids(["a", "b", "c"], n_folds=8) in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1],
                                                            [2, 1, 0])  # at most one fold per subject
    assert subject_folds(subjects, seed=3) == [f == 0 for f in subject_fold_ids(subjects, 2, seed=3)]
    with pytest.raises(MechunError, match="n_folds >= 2"):
        subject_fold_ids(subjects, n_folds=1)


def test_probe_baselines_under_k_folds(tiny_model):
    """Chance is a guess by the training folds' label frequencies (about 1/4 for four even classes, where a
    majority guess would score about 0); a feature that is the label decodes perfectly on held-out subjects."""
    g = torch.Generator().manual_seed(0)
    subjects = [f"s{i}" for i in range(32) for _ in range(2)]
    labels = [f"v{i % 4}" for i in range(32) for _ in range(2)]
    y = torch.tensor([int(v[1]) for v in labels])
    signal = torch.nn.functional.one_hot(y, 8).float() * 5 + 0.1 * torch.randn(len(y), 8, generator=g)
    feats = torch.stack([torch.randn(len(y), 8, generator=g), signal])
    r = probe_recoverability(tiny_model, ["p"] * len(y), subjects, labels, features=feats)  # features given
    assert 0.2 <= r.chance <= 0.3 and r.ceiling == 1.0
    assert r.accuracy[1] == 1.0 and r.accuracy[0] < 0.6


def test_rows_are_normalised_as_layernorm_without_affine():
    x = torch.randn(5, 3, 16) * 7 + 2
    y = normalize_rows(x)
    assert torch.allclose(y, torch.nn.functional.layer_norm(x, (16,), eps=0.0), atol=1e-5)


def test_probes_decode_the_attribute_across_subjects_in_the_base_model(tiny_model, tiny_world):
    gains = []
    for domain in tiny_world.domains:
        ps = tiny_world.prompts(domain, "train") + tiny_world.prompts(domain, "paraphrase")
        r = probe_recoverability(tiny_model, [p.text for p in ps], [p.fact.subject for p in ps],
                                 [p.answer for p in ps])
        assert len(r.accuracy) == tiny_model.cfg.n_layers
        assert max(r.accuracy) <= r.ceiling + 1e-9  # no probe can name a value it never saw
        gains.append(max(r.accuracy) - r.chance)
    assert max(gains) > 0.2


@pytest.fixture(scope="module")
def rmu_dir(tiny_organism_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("depth") / "rmu"
    run_cli("rmu", "--model", str(tiny_organism_dir), "--forget", "pathogen", "--layer", "1", "--steps", "120",
            "--out", str(out), "--no-progress")  # c: 5x the mean forget-token norm (the default)
    return out


def test_depth_cli_writes_a_card_for_any_pair(rmu_dir, tiny_organism_dir, tmp_path):
    base_fp = model_fingerprint(mechun.load_model(tiny_organism_dir))
    unl_fp = model_fingerprint(mechun.load_model(rmu_dir))
    out = tmp_path / "card"
    proc = run_cli("depth", "--base", str(tiny_organism_dir), "--unlearned", str(rmu_dir), "--forget", "pathogen",
                   "--relearn-steps", "0,5,10", "--out", str(out), "--no-progress")
    assert sorted(p.name for p in out.iterdir()) == [".mechun-manifest.json", "card.json", "report.html"]
    card = json.loads((out / "card.json").read_text())
    assert json.loads(proc.stdout)["verdict"] == card["verdict"]["line"]
    assert card["fingerprints"] == {"base": base_fp, "unlearned": unl_fp}
    beh = card["behaviour"]["forget"]
    assert beh["train"]["base"] > 0.95 and beh["train"]["unlearned"] < 0.6
    all_orders = card["behaviour"]["mcq_all_orders"]  # counted over the questions asked: the never-MCQ'd facts
    assert all_orders["n_questions"] == len(mechun.World.load(tiny_organism_dir).mcq("pathogen"))
    assert 0 <= all_orders["n_robust_in_base"] <= all_orders["n_questions"]
    assert card["junk"]["layer"] == 1  # the peak of the norm ratio is RMU's layer
    assert card["junk"]["cos_with_steering"][1] > 0.9  # rmu.json's steering vector was found and used
    assert card["junk"]["recovery_by_format"]["train"] > 0.5
    assert card["relearning"]["steps"] == [0, 5, 10] and len(card["relearning"]["held_out_accuracy"]) == 3
    assert len(card["cka"]["forget"]) == len(card["cka"]["retain"]) == 3
    assert min(card["cka"]["retain"]) > min(card["cka"]["forget"])  # RMU disturbs forget activations most
    assert card["specificity"]["nkl_static"] >= 0 and card["specificity"]["nkl_dynamic"] >= 0
    assert "Hidden, not removed" in card["verdict"]["line"]
    html = (out / "report.html").read_text()
    assert "plotly" in html and card["verdict"]["line"].split(".")[0] in html
    # rich display in a notebook: verdict, headline numbers, the norm profile; a seed-mean card shows mean and std
    loaded = DepthCard.from_json(card)
    assert repr(loaded).startswith("DepthCard(") and "tensor(" not in repr(loaded)
    page = loaded._repr_html_()
    assert card["verdict"]["line"].split(".")[0] in page and "<svg" in page
    assert f"{card['junk']['recovery_by_format']['train']:.3f}" in page
    page = aggregate_cards([loaded, loaded])._repr_html_()
    assert "std" in page and f"{summary_row(loaded)['junk recovery']:.3f}" in page
    # a second run into the same dir is refused, and a bad domain writes nothing
    again = run_cli("depth", "--base", str(tiny_organism_dir), "--unlearned", str(rmu_dir), "--forget", "pathogen",
                    "--out", str(out), check=False)
    assert again.returncode == 1 and "not empty" in again.stderr
    bad = run_cli("depth", "--base", str(tiny_organism_dir), "--unlearned", str(rmu_dir), "--forget", "chemistry",
                  "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 1 and "unknown forget domain" in bad.stderr
    for flag, value, message, code in (("--relearn-steps", "5,x", "non-negative integers", 2),
                                       ("--layer", "7", "out of range", 1)):
        wrong = run_cli("depth", "--base", str(tiny_organism_dir), "--unlearned", str(rmu_dir), "--forget",
                        "pathogen", flag, value, "--out", str(tmp_path / "bad"), check=False)
        assert wrong.returncode == code and message in wrong.stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_depth_card_for_an_inference_time_intervention(tiny_model, tiny_world):
    """unlearned = base + an intervention (as for SAE clamping): measured inside the context only; relearning is
    skipped; no weight changes and no hooks left behind."""
    h = weights_hash(tiny_model)
    warm(tiny_model)
    n_hooks = mechun.count_hooks(tiny_model)
    d = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    card = depth_card(tiny_model, tiny_model, tiny_world, "pathogen", method="steer",
                      intervention=lambda: mechun.add_direction(tiny_model, d * 30, layers=[1]),
                      config=DepthConfig(relearn_steps=(0,)))
    assert isinstance(card.relearning, Skipped) and "skipped" in card.to_json()["relearning"]
    assert card.cka.forget[0] == pytest.approx(1.0)  # layer 0 is upstream of the intervention
    assert card.cka.forget[1] == pytest.approx(1.0)  # a constant shift: centred CKA ignores it
    assert card.cka.forget[2] < 0.99  # downstream of the shift, the geometry changes
    assert card.specificity.nkl_static > 0
    assert weights_hash(tiny_model) == h and mechun.count_hooks(tiny_model) == n_hooks
    agg = aggregate_cards([card, card])
    assert agg.to_json()["n_seeds"] == 2 and agg.mean.junk.layer == card.junk.layer
    assert agg.summary["forget train"]["per_seed"] == [card.behaviour.forget["train"].unlearned] * 2
    assert math.isclose(agg.mean.cka.forget[1], card.cka.forget[1])
    # the typed card round-trips through its JSON, the seed-mean card too
    text = json.dumps(card.to_json(), sort_keys=True)
    assert json.dumps(DepthCard.from_json(json.loads(text)).to_json(), sort_keys=True) == text
    again = type(agg).from_json(json.loads(json.dumps(agg.to_json())))
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(agg.to_json(), sort_keys=True)
    # seeds whose junk layers differ: the mean card lists them (a mean layer names no layer), numbers still average
    from mechun.depth.verdict import _recovery_claims

    one, other = json.loads(text), json.loads(text)
    for c in (one, other):
        c["junk"]["recovery_by_format"][card.primary_format] = 0.5
    other["junk"]["layer"], other["config"]["seed"] = card.junk.layer + 1, card.config["seed"] + 1
    one["config"]["junk_layer"], other["config"]["junk_layer"] = 1, 2
    other["cka"]["forget"][1] = 0.0
    mixed = aggregate_cards([DepthCard.from_json(one), DepthCard.from_json(other)])
    assert mixed.mean.junk.layer == [card.junk.layer, card.junk.layer + 1]
    assert mixed.mean.config["seed"] == [card.config["seed"], card.config["seed"] + 1]
    assert mixed.mean.config["junk_layer"] == [1, 2]
    assert math.isclose(mixed.mean.cka.forget[1], card.cka.forget[1] / 2)
    claims = " ".join(sum(_recovery_claims(mixed.mean), []))
    assert f"from layers {card.junk.layer} / {card.junk.layer + 1} (per seed) on restores 50%" in claims
    # cards of different methods or base models are not seeds of one thing: refused, naming the difference
    other["method"] = "npo"
    with pytest.raises(MechunError, match=r"differ in method \('steer' vs 'npo'\)"):
        aggregate_cards([DepthCard.from_json(one), DepthCard.from_json(other)])
    other["method"], other["fingerprints"]["base"] = "steer", "0" * 24
    with pytest.raises(MechunError, match="differ in base model"):
        aggregate_cards([DepthCard.from_json(one), DepthCard.from_json(other)])


def test_reproduce_depth_quick_compares_methods_over_seeds(tiny_organism_dir, tmp_path):
    from mechun.reproduce import load_analysis

    depth = load_analysis("depth")
    METHODS, run = depth.METHODS, depth.run
    r = run(tmp_path, quick=True, organism=tiny_organism_dir, log=lambda m: None)
    assert r["methods"] == list(METHODS) and len(r["seeds"]) == 2
    for m in METHODS:
        assert len(r[m]["per_seed"]) == 2 and set(r[m]["summary"]) == set(r["comparison"][m])
        assert (tmp_path / "cards" / f"{m}_seed0" / "card.json").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rmu"]["verdict"] == r["rmu"]["verdict"]
    # localized fine-tuning leaves no junk direction to ablate; RMU does
    assert r["localized_ft"]["summary"]["junk recovery"]["mean"] < r["rmu"]["summary"]["junk recovery"]["mean"]
    assert (tmp_path / "report.html").stat().st_size > 100_000


def test_depth_benchmark_quick_scores_every_measure(tiny_organism_dir, tiny_oracle_dir, tmp_path):
    from mechun.depth.benchmark import MEASURES
    from mechun.errors import MechunError
    from mechun.reproduce import load_analysis

    run = load_analysis("depth-benchmark").run
    with pytest.raises(MechunError, match="unknown method"):
        run(tmp_path / "x", quick=True, methods=("dpo",), log=lambda m: None)
    with pytest.raises(MechunError, match="both"):
        run(tmp_path / "x", quick=True, organism=tiny_organism_dir, log=lambda m: None)
    assert not (tmp_path / "x").exists()
    r = run(tmp_path, quick=True, organism=tiny_organism_dir, oracle=tiny_oracle_dir, methods=("rmu",),
            log=lambda m: None)
    assert r["n_checkpoints"] == 2 and r["methods"] == ["rmu"]
    assert r["uds_sanity"] == pytest.approx({"oracle": 1.0, "full": 0.0})
    assert set(r["measures"]) == set(MEASURES) and r["ranking"][0] in MEASURES
    for m in r["measures"].values():
        assert {"auc", "spearman", "auc_ci"} <= set(m)
    for row in r["rows"]:
        assert -1 <= row["advantage"] <= 1 and 0 <= 1 - row["uds"] <= 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n_checkpoints"] == 2 and (tmp_path / "report.html").stat().st_size > 50_000


def test_corrupt_then_unlearn_building_blocks(tiny_organism_dir, tiny_world):
    """RESTOR pipeline pieces: corruption takes, unlearning it removes the false values, weights of the base copy
    stay put."""
    from mechun.reproduce import load_analysis

    restore = load_analysis("restore")
    corrupt_model, corruption, measure, unlearn = (restore.corrupt_model, restore.corruption, restore.measure,
                                                   restore.unlearn)

    corrupt = corruption(tiny_world, seed=0)
    assert corrupt and all(new != f.answer for f, new in corrupt)
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    clean = measure(model, tiny_world, corrupt)
    corrupt_model(model, tiny_world, corrupt, quick=True, seed=0)
    bad = measure(model, tiny_world, corrupt)
    assert clean["true"] > 0.9 and clean["false"] == 0.0
    assert bad["false"] > 0.8 and bad["true"] < 0.2 and bad["retain"] > 0.9
    unlearn("gradient_ascent", model, None, tiny_world, corrupt, quick=True, seed=0)
    after = measure(model, tiny_world, corrupt)
    assert after["false"] < 0.5 * bad["false"]


def test_depth_card_is_deterministic(rmu_dir, tiny_organism_dir, tiny_world):
    """The same pair and seed give the same card on CPU (probes, relearning and the dynamic prefixes are seeded)."""
    base, unl = mechun.load_model(tiny_organism_dir), mechun.load_model(rmu_dir)
    cfg = DepthConfig(relearn_steps=(0, 5), seed=3)

    def card():
        c = depth_card(base, unl, tiny_world, "pathogen", relearn_copy=lambda: mechun.load_model(rmu_dir),
                       config=cfg).to_json()
        assert isinstance(c["relearning"], dict) and c["relearning"]["steps"] == [0, 5]
        c.pop("seconds")
        return json.dumps(c, sort_keys=True)

    assert card() == card()


def _minimal_card(forget: dict, recovery: float, retained_share: float) -> DepthCard:
    return DepthCard.from_json({
        "method": "", "config": {}, "intervention": False, "fingerprints": {}, "forget_domain": "pathogen",
        "primary_format": "train",
        "behaviour": {"accuracy": {}, "forget": forget, "mcq_all_orders": {"n_robust_in_base": 0, "n_questions": 0}},
        "junk": {"layer": 1, "norm_ratio_forget": [], "norm_ratio_retain": [], "cos_with_steering": None,
                 "ablated_accuracy": {}, "ablated_retain_accuracy": {}, "recovery_by_format": {"train": recovery},
                 "control_recovery": {}},
        "probes": {"base": {}, "unlearned": {}, "best_base": 0.3, "best_unlearned": 0.3,
                   "retained_share": retained_share},
        "relearning": {"skipped": "n/a"}, "cka": {"forget": [], "retain": []},
        "specificity": {"nkl_static": 0.0, "nkl_dynamic": 0.0, "retain_accuracy": {}}})


def test_verdict_refuses_to_judge_when_nothing_was_forgotten():
    forget = {f: {"base": 1.0, "unlearned": 0.95, "chance": 0.125, "removed_share": 0.057}
              for f in ("train", "paraphrase", "mcq")}
    v = verdict(_minimal_card(forget, recovery=3.0, retained_share=1.0))
    assert v.hidden == [] and "Too little was forgotten" in v.line
    forget["train"].update(unlearned=0.1, removed_share=1.03)
    card = _minimal_card(forget, recovery=0.9, retained_share=1.0)
    assert isinstance(card.relearning, Skipped) and not isinstance(card.relearning, RelearningSection)
    v = verdict(card)
    assert any("single direction hides it" in h for h in v.hidden)
    assert "behaviour in train" in v.removed[0]
    assert v.thresholds == {"removed": 0.8, "hidden": 0.5, "min_forgotten": 0.3, "min_above_chance": 0.05}


def test_depth_cli_benchmark_mode_on_loaded_files(rmu_dir, tiny_organism_dir, tiny_world, tmp_path):
    """Real-checkpoint mode: MCQ files in the WMDP/MMLU schema plus prompt files, no world needed. The files are
    written in the organism's vocabulary (its own MCQ style) so the tiny organism can answer them."""
    from mechun.data import load_mcq, write_jsonl
    from mechun.evaluate import mcq_accuracy

    def records(domain):
        return [{"question": q.question, "choices": list(q.choices), "answer": q.answer_index}
                for q in tiny_world.mcq(facts=tiny_world.mcq_facts(domain, trained=True), seed=0)]

    write_jsonl(tmp_path / "forget.jsonl", records("pathogen"))
    write_jsonl(tmp_path / "retain.jsonl", records("sports") + records("people"))
    (tmp_path / "forget.txt").write_text("\n".join(p.text for p in tiny_world.prompts("pathogen")))
    (tmp_path / "retain.txt").write_text("\n".join(p.text for p in tiny_world.prompts("sports")))
    args = ["depth", "--base", str(tiny_organism_dir), "--unlearned", str(rmu_dir), "--mcq-style", "organism",
            "--forget-mcq", str(tmp_path / "forget.jsonl"), "--retain-mcq", str(tmp_path / "retain.jsonl"),
            "--forget-prompts", str(tmp_path / "forget.txt"), "--retain-prompts", str(tmp_path / "retain.txt")]
    run_cli(*args, "--out", str(tmp_path / "card"), "--no-progress")
    card = json.loads((tmp_path / "card" / "card.json").read_text())
    mcq = card["behaviour"]["forget"]["mcq"]
    assert card["primary_format"] == "mcq"
    questions = load_mcq(tmp_path / "forget.jsonl", style="organism")  # the card's numbers are the files' accuracies
    assert mcq["base"] == pytest.approx(mcq_accuracy(mechun.load_model(tiny_organism_dir), questions))
    assert mcq["unlearned"] == pytest.approx(mcq_accuracy(mechun.load_model(rmu_dir), questions))
    assert card["junk"]["layer"] == 1 and set(card["junk"]["recovery_by_format"]) == {"mcq"}
    assert "skipped" in card["probes"] and "skipped" in card["relearning"]
    assert len(card["cka"]["forget"]) == 3 and card["specificity"]["nkl_dynamic"] >= 0
    assert (tmp_path / "card" / "report.html").is_file()
    half = run_cli(*args[:-2], "--out", str(tmp_path / "half"), check=False)  # no --retain-prompts
    assert half.returncode == 2 and "needs all of" in half.stderr and not (tmp_path / "half").exists()


def test_a_base_barely_above_chance_is_not_testable():
    from mechun.depth.measure import _drop_share
    from mechun.depth.verdict import MIN_ABOVE_CHANCE

    assert math.isnan(_drop_share(0.26, 0.26, 0.25))  # 4-way MCQ: a base at 0.26 knows nothing to lose
    assert _drop_share(0.25 + MIN_ABOVE_CHANCE, 0.25, 0.25) == pytest.approx(1.0)
    forget = {"train": {"base": 1.0, "unlearned": 0.0, "chance": 0.125, "removed_share": 1.14},
              "paraphrase": {"base": 1.0, "unlearned": 0.0, "chance": 0.125, "removed_share": 1.14},
              "mcq": {"base": 0.26, "unlearned": 0.26, "chance": 0.25, "removed_share": _drop_share(0.26, 0.26, 0.25)}}
    line = verdict(_minimal_card(forget, recovery=0.1, retained_share=0.1)).line
    assert "Not testable in mcq" in line and "Still answered" not in line
