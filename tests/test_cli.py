"""The command line: every command has --help, errors are clear and exit non-zero, output formats hold."""

import pytest
from conftest import TINY_SEED, run_cli, run_cli_process


@pytest.mark.parametrize("cmd", [[], ["organism"], ["organism", "train"], ["eval"], ["cache"], ["reproduce"]])
def test_help(cmd):
    proc = run_cli(*cmd, "--help")
    assert "usage: mechun" in proc.stdout and proc.returncode == 0


def test_installed_script_exit_codes(tmp_path):
    """The process boundary: the installed script's exit status for success, a usage error and a runtime error."""
    assert "usage: mechun" in run_cli_process("--help").stdout
    usage = run_cli_process("rmu", "--model", "m", "--forget", "pathogen", "--steps", "-1", "--out", "x", check=False)
    assert usage.returncode == 2 and "--steps" in usage.stderr
    runtime = run_cli_process("eval", "--model", str(tmp_path / "nope"), check=False)
    assert runtime.returncode == 1 and runtime.stderr.startswith("mechun: error:") and "Traceback" not in runtime.stderr


def test_eval_human_readable(tiny_organism_dir):
    out = run_cli("eval", "--model", str(tiny_organism_dir)).stdout
    assert "pathogen" in out and "forget" in out and "paraphrase" in out


def test_eval_missing_dir_is_a_clear_error(tmp_path):
    proc = run_cli("eval", "--model", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 1 and "mechun: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_cache_command(tiny_organism_dir, tiny_world, tmp_path):
    from mechun import ResidualCache

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(p.text for p in tiny_world.prompts("sports")[:5]) + "\n")
    run_cli("cache", "--model", str(tiny_organism_dir), "--prompts", str(prompts), "--layers", "0,2",
            "--out", str(tmp_path / "c.safetensors"), "--no-progress")
    cache = ResidualCache.load(tmp_path / "c.safetensors")
    assert cache.layers == [0, 2] and len(cache) == 5


def test_reproduce_quick(tiny_organism_dir, tmp_path):
    # the session's tiny organism (its cache entry), not another one trained for this test
    run_cli("reproduce", "organism", "--quick", "--seed", str(TINY_SEED), "--out", str(tmp_path / "r"))
    html = (tmp_path / "r" / "report.html").read_text()
    assert "plotly" in html.lower() and "<script src=\"http" not in html  # self-contained
    import json

    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["accuracy"]["pathogen"]["train"] >= 0.9
