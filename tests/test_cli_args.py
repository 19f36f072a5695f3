"""Argument handling of the ``mechun`` command, in process and without models: a mistake in the arguments is a
usage error (exit 2, the command's usage line, the option named) raised before any work, so nothing is written;
defaults are the library's; prompt files are read by one library function."""

import dataclasses
import inspect

import pytest

from mechun import cli
from mechun.data import DataError, DataFileNotFoundError, read_prompts
from mechun.depth import DepthConfig
from mechun.edit import localized_finetune
from mechun.reproduce import ANALYSES
from mechun.sae import train_sae
from mechun.unlearn.rmu import RMUConfig

NOPE = "/nonexistent/mechun-test-model"  # never loaded: the usage error must come first

RMU = ["rmu", "--model", NOPE, "--forget", "pathogen"]
DEPTH = ["depth", "--base", NOPE, "--unlearned", NOPE]
EDIT = ["edit", "--model", NOPE, "--relation", "sport", "--subjects", "a;b"]
JUNK = ["junk", "--base", NOPE, "--unlearned", NOPE]
LOCALIZE = ["localize", "--model", NOPE]
SAE_TRAIN = ["sae", "train", "--model", NOPE, "--layer", "1"]

# (argv before --out, the option the message must name)
BAD = [
    ([*RMU, "--steps", "-1"], "--steps"),
    ([*RMU, "--steps", "0"], "--steps"),
    ([*RMU, "--steps", "1.5"], "--steps"),
    ([*RMU, "--lr", "nan"], "--lr"),
    ([*RMU, "--lr", "-1"], "--lr"),
    ([*RMU, "--lr", "inf"], "--lr"),
    ([*RMU, "--batch-size", "0"], "--batch-size"),
    ([*RMU, "--steering-coeff", "nan"], "--steering-coeff"),
    ([*RMU, "--steering-coeff", "0"], "--steering-coeff"),
    ([*RMU, "--alpha", "-1"], "--alpha"),
    ([*RMU, "--alpha", "nan"], "--alpha"),
    ([*DEPTH, "--forget", "pathogen", "--relearn-steps", "x"], "--relearn-steps"),
    ([*DEPTH, "--forget", "pathogen", "--relearn-steps", "-3"], "--relearn-steps"),
    ([*DEPTH, "--forget", "pathogen", "--relearn-steps", "5,x"], "--relearn-steps"),
    ([*DEPTH, "--forget-mcq", "f.jsonl", "--retain-mcq", "r.jsonl"], "--forget-prompts"),
    ([*DEPTH, "--forget", "pathogen", "--retain-prompts", "r.txt"], "--forget-mcq"),
    (DEPTH, "--forget"),
    ([*DEPTH, "--forget", "pathogen", "--device", "cpu", "--device-map", "auto"], "--device-map"),
    ([*DEPTH, "--forget", "pathogen", "--dtype", "float99"], "--dtype"),
    (["cache", "--model", NOPE, "--prompts", "p.txt", "--layers", "two"], "--layers"),
    (["cache", "--model", NOPE, "--prompts", "p.txt", "--batch-size", "0"], "--batch-size"),
    (["cache", "--model", NOPE, "--prompts", "p.txt", "--hook", "resid"], "--hook"),
    ([*JUNK, "--forget-prompts", "f.txt"], "--retain-prompts"),
    ([*JUNK, "--retain-prompts", "r.txt"], "--forget-prompts"),
    ([*EDIT, "--mode", "edit"], "--new-answer"),
    ([*EDIT, "--components", "mlp"], "--components"),
    ([*EDIT, "--components", "ffn:1"], "--components"),
    ([*EDIT, "--components", "mlp:1,attn:x"], "--components"),
    ([*EDIT, "--steps", "0"], "--steps"),
    ([*EDIT, "--lr", "nan"], "--lr"),
    ([*LOCALIZE, "--method", "causal-tracing", "--prompt", "p", "--answer", "a"], "--subject"),
    ([*LOCALIZE, "--method", "activation-patching", "--clean", "c", "--corrupt", "x", "--answer", "a"], "--wrong"),
    ([*LOCALIZE, "--method", "probing"], "--relation"),
    ([*LOCALIZE, "--method", "causal-tracing", "--prompt", "p", "--answer", "a", "--subject", "s", "--samples", "0"],
     "--samples"),
    ([*SAE_TRAIN, "--d-sae", "0"], "--d-sae"),
    ([*SAE_TRAIN, "--tokens", "-5"], "--tokens"),
    (["reproduce", "no-such-analysis"], "analysis"),
]


def _usage(argv: list[str]) -> str:
    words = argv[:2] if argv[0] in ("sae", "organism") else argv[:1]
    return "usage: mechun " + " ".join(words)


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[f"{a[0]} {' '.join(a[-2:])}" for a, _ in BAD])
def test_bad_argument_is_a_usage_error_before_any_work(argv, option, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert _usage(argv) in err and option in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["sae", "unlearn", "--model", NOPE, "--sae", NOPE, "--forget", "pathogen",
                                   "--value", "nan"],
                                  ["sae", "unlearn", "--model", NOPE, "--sae", NOPE, "--forget", "pathogen",
                                   "--threshold", "-0.1"]])
def test_bad_argument_of_a_command_without_out(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: mechun sae unlearn" in err and argv[-2] in err


def test_usage_error_messages_say_what_is_wrong(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([*RMU, "--lr", "nan", "--out", str(tmp_path / "o")])
    assert "expected a finite number > 0, got 'nan'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*DEPTH, "--forget", "pathogen", "--relearn-steps", "5,x", "--out", str(tmp_path / "o")])
    assert "non-negative integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*DEPTH, "--forget-mcq", "f.jsonl", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "benchmark mode needs all of" in err and "missing --retain-mcq, --forget-prompts, --retain-prompts" in err


@pytest.mark.parametrize(("argv", "expected"), [
    ([*RMU, "--lr", "1e-4", "--alpha", "0", "--steering-coeff", "6.5"], {"lr": 1e-4, "alpha": 0.0,
                                                                         "steering_coeff": 6.5}),
    ([*DEPTH, "--forget", "pathogen", "--relearn-steps", "0,5", "--dtype", "bfloat16"],
     {"relearn_steps": [0, 5], "dtype": "bfloat16"}),
    (["cache", "--model", NOPE, "--prompts", "p.txt", "--layers", "0,-1"], {"layers": [0, -1]}),
    ([*EDIT, "--components", "mlp:1,attn:-1"], {"components": "mlp:1,attn:-1"}),
])
def test_good_values_parse(argv, expected):
    args = cli.build_parser().parse_args([*argv, "--out", "o"])
    assert {k: getattr(args, k) for k in expected} == expected


HELP = [["organism", "train"], ["eval"], ["cache"], ["rmu"], ["junk"], ["localize"], ["edit"], ["sae", "train"],
        ["sae", "unlearn"], ["depth"], ["reproduce"]]


@pytest.mark.parametrize("cmd", [[], *HELP], ids=lambda c: " ".join(c) or "mechun")
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*cmd, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(" ".join(["usage: mechun", *cmd]))


def test_rmu_defaults_are_the_library_defaults(capsys):
    args = cli.build_parser().parse_args([*RMU, "--out", "o"])
    cfg = RMUConfig(["pathogen"])
    for name in ("layer", "steering_coeff", "alpha", "lr", "steps", "batch_size", "seed"):
        assert getattr(args, name) == getattr(cfg, name), name
    assert {f.name for f in dataclasses.fields(RMUConfig)} >= {"steps", "alpha", "lr", "batch_size"}
    with pytest.raises(SystemExit):
        cli.main(["rmu", "--help"])
    assert f"(default: {cfg.steps})" in capsys.readouterr().out


def test_other_defaults_are_the_library_defaults():
    parse = cli.build_parser().parse_args
    sae = parse([*SAE_TRAIN, "--out", "o"])
    params = inspect.signature(train_sae).parameters
    assert (sae.d_sae, sae.k, sae.tokens) == tuple(params[n].default for n in ("d_sae", "k", "training_tokens"))
    depth = parse([*DEPTH, "--forget", "pathogen", "--out", "o"])
    assert tuple(depth.relearn_steps) == DepthConfig().relearn_steps
    edit = parse([*EDIT, "--out", "o"])
    params = inspect.signature(localized_finetune).parameters
    assert (edit.steps, edit.lr) == (params["steps"].default, params["lr"].default)


def test_reproduce_choices_are_the_library_analyses_each_described(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at the hyphens of names
    for name in ANALYSES:
        assert f"{name}:" in text
    assert set(cli._ANALYSIS_HELP) == set(ANALYSES)  # a new analysis needs its one-line description


# -- runtime errors: `mechun: error: ...` and exit status 1, and still before anything is written ----------
def test_missing_prompt_file_is_a_runtime_error_naming_it(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code = cli.main(["cache", "--model", NOPE, "--prompts", str(tmp_path / "p.txt"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("mechun: error: no file at") and "p.txt" in err and not out.exists()


@pytest.mark.parametrize("argv", [RMU, ["junk", "--base", NOPE, "--unlearned", NOPE]], ids=["rmu", "junk"])
def test_non_empty_out_is_refused_before_loading(argv, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = cli.main([*argv, "--out", str(tmp_path / "out")])
    assert code == 1 and "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# -- read_prompts ----------------------------------------------------------------------------------------------------
def test_read_prompts_one_per_non_empty_line_stripped(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("  first prompt \n\n\tsecond\r\n   \nthird")
    assert read_prompts(p) == ["first prompt", "second", "third"]
    assert read_prompts(str(p)) == ["first prompt", "second", "third"]


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):  # generic handlers keep working
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_read_prompts_empty_file_names_it(tmp_path, text):
    p = tmp_path / "blank.txt"
    p.write_text(text)
    with pytest.raises(DataError, match=r"blank\.txt: no prompts"):
        read_prompts(p)


def test_read_prompts_refuses_a_directory(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        read_prompts(tmp_path)
