"""The depth benchmark's per-checkpoint measures on loaded checkpoints with TOFU-format question files."""

import json
import math

import pytest
from conftest import run_cli, weights_hash

import mechun
from mechun.data import QA, DataError, load_qa, qa_prompts, qa_template
from mechun.depth.checkpoint import QA_MEASURES, CheckpointCard, qa_checkpoint_card
from mechun.hooks import count_hooks
from mechun.organism.world import other_values


def _tofu_records(world, domain):
    """TOFU-format records made from the organism's facts: a question, its answer, a paraphrased question and wrong
    answers (as in the ``*_perturbed`` splits)."""
    out = []
    for fact in world.facts_of(domain)[:24]:
        train = [p for p in world.prompts(domain) if p.fact == fact][0]
        para = [p for p in world.prompts(domain, "paraphrase") if p.fact == fact][0]
        wrong = other_values(fact)[:3]
        out.append({"question": train.text, "answer": fact.answer, "paraphrased_question": para.text,
                    "perturbed_answer": wrong})
    return out


@pytest.fixture(scope="module")
def tofu_files(tiny_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("tofu")
    forget = _tofu_records(tiny_world, "pathogen")
    # as the hub ships them: JSON Lines under a .json name; and a JSON array
    (d / "forget.json").write_text("".join(json.dumps(r) + "\n" for r in forget))
    (d / "retain.json").write_text(json.dumps(_tofu_records(tiny_world, "geography")))
    return d


def test_load_qa_reads_both_json_layouts_and_renders_templates(tofu_files):
    forget, retain = load_qa(tofu_files / "forget.json"), load_qa(tofu_files / "retain.json")
    n_lines = len((tofu_files / "forget.json").read_text().splitlines())
    assert len(forget) == n_lines and len(retain) == len(json.loads((tofu_files / "retain.json").read_text()))
    assert all(isinstance(q, QA) for q in forget)
    assert forget[0].source == "forget.json:line 1" and retain[0].source == "retain.json:record 0"
    assert len(forget[0].perturbed_answers) == 3 and forget[0].paraphrased_question
    prompts, answers = qa_prompts(forget[:2], "llama2-chat")
    assert prompts[0] == f"[INST] {forget[0].question} [/INST]" and answers == [q.answer for q in forget[:2]]
    para, para_answers = qa_prompts(forget[:2], "raw", paraphrased=True)
    assert para == [q.paraphrased_question for q in forget[:2]] and para_answers == answers


@pytest.mark.parametrize(("content", "match"), [
    ('{"question": "Who?"}\n', r"line 1: field 'answer' is missing"),
    ('[{"question": "Who?", "answer": 3}]', r"record 0: field 'answer' is int 3"),
    ('{"question": "Who?", "answer": "A"}\n{"question": "", "answer": "B"}\n', r"line 2: field 'question' is empty"),
    ('{"question": "Who?", "answer": "A", "perturbed_answer": [1]}\n', r"field 'perturbed_answer\[0\]' is int"),
    ("", "empty file"),
    ('{"data": [{"question": "Who?", "answer": "A"}]}', "field 'data' holds 1 records"),
    ('{"question": "Who?", "answer": "A"}\n{broken\n', "line 2: invalid JSON"),
])
def test_load_qa_names_the_record_and_field_of_a_bad_file(tmp_path, content, match):
    f = tmp_path / "forget10.json"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_qa(f)


def test_qa_template_must_hold_one_question_slot():
    assert qa_template("plain") == "Question: {question}\nAnswer:"
    for bad in ("Q: {q}", "{question} {question}", "{question} {other}"):
        with pytest.raises(DataError, match="template"):
            qa_template(bad)


def test_measures_sit_at_their_ends_for_the_oracle_and_the_full_model(tiny_organism_dir, tiny_oracle_dir,
                                                                      tiny_model, tofu_files):
    oracle = mechun.load_model(tiny_oracle_dir, device="cpu")
    forget, retain = load_qa(tofu_files / "forget.json"), load_qa(tofu_files / "retain.json")
    hashes = weights_hash(tiny_model), weights_hash(oracle)
    as_oracle = qa_checkpoint_card(tiny_model, oracle, oracle, forget, retain, "raw")
    as_full = qa_checkpoint_card(tiny_model, oracle, tiny_model, forget, retain, "raw")
    assert set(as_oracle.measures) == set(QA_MEASURES)
    # the oracle as the unlearned model: no knowledge left by UDS and by behaviour relative to the oracle
    assert as_oracle.measures["uds"] == pytest.approx(0.0) and as_oracle.measures["logprob_vs_oracle"] == 0.0
    # the full model as the unlearned model: everything left
    assert as_full.measures["uds"] == pytest.approx(1.0) and as_full.measures["logprob_vs_oracle"] == 1.0
    assert as_full.measures["cka"] == pytest.approx(1.0) and as_full.measures["norm_ratio"] == pytest.approx(-1.0)
    assert as_full.measures["forget_token_accuracy"] > as_oracle.measures["forget_token_accuracy"] + 0.5
    assert as_full.behaviour["full"]["forget_logprob"] > as_full.behaviour["retain"]["forget_logprob"] + 1
    assert as_oracle.measures["cka"] < 1 and as_oracle.uds["n_scored"] > 0
    assert (weights_hash(tiny_model), weights_hash(oracle)) == hashes
    assert count_hooks(tiny_model) == 0 and count_hooks(oracle) == 0
    loaded = CheckpointCard.from_json(json.loads(json.dumps(as_full.to_json())))
    assert json.dumps(loaded.measures) == json.dumps(as_full.measures)
    # junk recovery is a share of the lost log-prob: undefined when nothing was lost, small for the oracle
    assert math.isnan(as_full.measures["junk_recovery"]) and as_oracle.measures["junk_recovery"] < 0.5
    assert "tensor(" not in repr(as_oracle) and f"{as_oracle.uds['score']:.4g}" in repr(as_oracle)
    page = as_oracle._repr_html_()
    assert "<svg" in page and f"{as_oracle.uds['score']:.3f}" in page
    assert f"{as_oracle.measures['cka']:.3f}" in page


def test_cli_depth_measures_writes_measures_and_report(tiny_organism_dir, tiny_oracle_dir, tofu_files, tmp_path):
    out = tmp_path / "card"
    proc = run_cli("depth-measures", "--full", tiny_organism_dir, "--retain", tiny_oracle_dir, "--unlearned",
                   tiny_oracle_dir, "--forget-qa", tofu_files / "forget.json", "--retain-qa",
                   tofu_files / "retain.json", "--template", "raw", "--max-questions", "8", "--out", out,
                   "--no-progress")
    data = json.loads((out / "measures.json").read_text())
    assert data["n_forget"] == 8 and data["measures"]["uds"] == pytest.approx(0.0)
    assert json.loads(proc.stdout)["uds_score"] == pytest.approx(1.0)
    assert "<h2>measures.json</h2>" in (out / "report.html").read_text()
    assert "Depth measures" in (out / "report.html").read_text() and "plotly" in (out / "report.html").read_text()


def test_cli_depth_measures_checks_inputs_before_loading(tiny_organism_dir, tofu_files, tmp_path):
    base = ("depth-measures", "--full", tiny_organism_dir, "--retain", tiny_organism_dir, "--unlearned",
            tiny_organism_dir, "--out", tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text('{"question": "Who?"}\n')
    cases = [
        (("--forget-qa", bad, "--retain-qa", tofu_files / "retain.json"), "field 'answer' is missing"),
        (("--forget-qa", tmp_path / "none.json", "--retain-qa", bad), "no file at"),
        (("--forget-qa", tofu_files / "forget.json", "--retain-qa", tofu_files / "retain.json", "--template",
          "Q: {q}"), "must contain '{question}'"),
        (("--forget-qa", tofu_files / "forget.json", "--retain-qa", tofu_files / "forget.json"), "the same file"),
    ]
    for extra, message in cases:
        proc = run_cli(*base, *extra, check=False)
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
    proc = run_cli("depth-measures", "--full", tmp_path / "nowhere", "--retain", tiny_organism_dir, "--unlearned",
                   tiny_organism_dir, "--forget-qa", tofu_files / "forget.json", "--retain-qa",
                   tofu_files / "retain.json", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 1 and "no checkpoint directory" in proc.stderr
