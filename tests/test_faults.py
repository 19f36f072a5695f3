"""Fault injection: bad inputs, damaged files, interruptions, concurrency and full disks.

Every case asserts the exit status (1 for a runtime error; 2 only for usage mistakes, covered by test_cli_args), a
one-line message naming the problem, and -- by hashing the whole user tree before and after -- that no user file
was changed, replaced or deleted. Cases that must *work* (a single-string prompt, --overwrite of mechun's own
output) assert the correct result instead.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechun import cli
from mechun.errors import CheckpointError, DamagedFileError, MechunError, ModelMismatchError, OutputError

# -- helpers ---------------------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def refused(capsys, root: Path, argv: list, *fragments: str, code: int = 1) -> str:
    """Run ``argv``; it must fail with ``code`` and one line containing ``fragments``, leaving ``root`` unchanged."""
    before = tree(root)
    got, _, err = run(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("mechun: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert tree(root) == before, "a refusing command changed the user's files"
    return lines[0]


@pytest.fixture
def victim(tiny_organism_dir, tmp_path) -> Path:
    """A user's own copy of an organism checkpoint, to damage or to aim outputs at."""
    dst = tmp_path / "victim"
    shutil.copytree(tiny_organism_dir, dst)
    return dst


@pytest.fixture
def prompts(tmp_path, tiny_world) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(q.text for q in tiny_world.prompts("pathogen")[:4]) + "\n")
    return p


def _fact(world):
    return world.facts_of(relation=world.facts[0].relation)[0]


# -- outputs mechun must not replace ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_cache_never_replaces_a_checkpoints_weights(victim, prompts, tmp_path, capsys, overwrite):
    argv = ["cache", "--model", victim, "--prompts", prompts, "--out", victim / "model.safetensors"]
    line = refused(capsys, tmp_path, argv + (["--overwrite"] if overwrite else []),
                   "model.safetensors")
    assert ("not written by mechun" in line) if overwrite else ("already exists" in line)


def test_cache_overwrite_replaces_its_own_cache(tiny_organism_dir, prompts, tmp_path, capsys):
    from mechun import ResidualCache

    out = tmp_path / "c.safetensors"
    code, _, err = run(capsys, "cache", "--model", tiny_organism_dir, "--prompts", prompts, "--layers", "0",
                       "--out", out)
    assert code == 0, err
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", prompts, "--out", out],
            "already exists", "--overwrite")
    code, _, err = run(capsys, "cache", "--model", tiny_organism_dir, "--prompts", prompts, "--layers", "0,1",
                       "--out", out, "--overwrite")
    assert code == 0, err
    assert ResidualCache.load(out).layers == [0, 1]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_localize_never_replaces_a_users_file(tiny_organism_dir, tiny_world, tmp_path, capsys, overwrite):
    f = tmp_path / "notes.json"
    f.write_text('{"my": "notes"}')
    fact = _fact(tiny_world)
    argv = ["localize", "--model", tiny_organism_dir, "--method", "causal-tracing", "--prompt",
            tiny_world.prompts(facts=[fact])[0].text, "--subject", fact.subject, "--answer", fact.answer, "--out", f]
    refused(capsys, tmp_path, argv + (["--overwrite"] if overwrite else []), "notes.json")


def test_localize_overwrite_replaces_its_own_json(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    argv = ["localize", "--model", tiny_organism_dir, "--method", "causal-tracing", "--prompt",
            tiny_world.prompts(facts=[fact])[0].text, "--subject", fact.subject, "--answer", fact.answer,
            "--samples", "2", "--out", tmp_path / "t.json"]
    assert run(capsys, *argv)[0] == 0
    assert run(capsys, *argv, "--seed", "1", "--overwrite")[0] == 0
    assert json.loads((tmp_path / "t.json").read_text())["mechun"]["command"] == "localize"


NOPE = "/nonexistent/mechun-model"
DIR_COMMANDS = {
    "organism": ["organism", "train", "--preset", "tiny"],
    "rmu": ["rmu", "--model", NOPE, "--forget", "pathogen"],
    "junk": ["junk", "--base", NOPE, "--unlearned", NOPE],
    "edit": ["edit", "--model", NOPE, "--relation", "sport", "--subjects", "a"],
    "sae-train": ["sae", "train", "--model", NOPE, "--layer", "1"],
    "depth": ["depth", "--base", NOPE, "--unlearned", NOPE, "--forget", "pathogen"],
    "reproduce": ["reproduce", "organism", "--quick"],
}


@pytest.mark.parametrize("cmd", list(DIR_COMMANDS))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_users_non_empty_dir_is_refused_before_any_work(cmd, overwrite, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "mine.txt").write_text("mine")
    line = refused(capsys, tmp_path, [*DIR_COMMANDS[cmd], "--out", out] + (["--overwrite"] if overwrite else []))
    assert ("not written by mechun" in line) if overwrite else ("not empty" in line and "--overwrite" in line)


@pytest.mark.parametrize("cmd", ["organism", "rmu", "depth"])
def test_an_existing_file_as_out_dir_is_refused(cmd, tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("mine")
    refused(capsys, tmp_path, [*DIR_COMMANDS[cmd], "--out", f, "--overwrite"], "existing file")


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(capsys, tmp_path, [*DIR_COMMANDS["organism"], "--out", tmp_path / "f" / "org"], "is a file")


def test_read_only_out_is_refused_before_the_work(tmp_path, capsys):
    ro = Path("/proc/mechun-out")  # /proc cannot take new entries, even for root (chmod does not stop root)
    refused(capsys, tmp_path, [*DIR_COMMANDS["organism"], "--out", ro], "cannot write")


def test_overwrite_refuses_a_mechun_output_with_a_user_file_added(tmp_path, capsys):
    """`reproduce --out R` must not delete a user's file inside R/rmu_seed2/ (nor replace R/results.json)."""
    from mechun.io import write_manifest

    out = tmp_path / "R"
    (out / "rmu_seed2").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "rmu_seed2" / "model.safetensors").write_bytes(b"weights")
    write_manifest(out, "mechun reproduce rmu-shallow")
    (out / "rmu_seed2" / "my_notes.txt").write_text("mine")
    refused(capsys, tmp_path, ["reproduce", "rmu-shallow", "--quick", "--out", out, "--overwrite"],
            "rmu_seed2/my_notes.txt", "never deletes")


def test_overwrite_refuses_a_mechun_file_changed_since(tmp_path, capsys):
    from mechun.io import write_manifest

    out = tmp_path / "R"
    out.mkdir()
    (out / "results.json").write_text("{}")
    write_manifest(out, "x")
    (out / "results.json").write_text('{"edited": "by the user"}')
    refused(capsys, tmp_path, ["reproduce", "organism", "--quick", "--out", out, "--overwrite"], "results.json")


def test_an_interrupted_run_is_not_overwritten(tmp_path, capsys):
    from mechun.io import write_manifest

    out = tmp_path / "R"
    out.mkdir()
    (out / "half.json").write_text("{")
    write_manifest(out, "mechun reproduce organism", complete=False)
    refused(capsys, tmp_path, ["reproduce", "organism", "--quick", "--out", out, "--overwrite"], "interrupted")


# -- whole or nothing -------------------------------------------------------------------------------------------------
def test_run_dir_failure_restores_the_earlier_output(tmp_path):
    from mechun.io import run_dir

    out = tmp_path / "R"
    with run_dir(out, "test") as d:
        (d / "results.json").write_text("old")
        (d / "organism").mkdir()
        (d / "organism" / "w").write_text("weights")
    before = tree(out)
    with pytest.raises(RuntimeError), run_dir(out, "test", overwrite=True) as d:
        (d / "results.json").write_text("half")
        raise RuntimeError("the analysis failed")
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["R"]  # no temp left beside it
    with run_dir(out, "test", overwrite=True) as d:
        (d / "results.json").write_text("new")
    assert (out / "results.json").read_text() == "new" and not (out / "organism").exists()


def test_run_dir_failure_in_a_new_dir_leaves_nothing(tmp_path):
    from mechun.io import run_dir

    with pytest.raises(KeyboardInterrupt), run_dir(tmp_path / "R", "test") as d:
        (d / "part.json").write_text("{")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    from mechun.io import atomic_dir

    with pytest.raises(OSError), atomic_dir(tmp_path / "ckpt", "checkpoint") as d:
        (d / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_a_save_leaves_no_file_and_says_so(tiny_organism_dir, prompts, tmp_path, capsys,
                                                            monkeypatch):
    import mechun.io

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mechun.io, "save_file", full)
    out = tmp_path / "out" / "c.safetensors"
    out.parent.mkdir()
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", prompts, "--out", out],
            "no space left", "nothing was written")
    assert list(out.parent.iterdir()) == []


def test_too_little_disk_space_is_refused_before_training(tiny_organism_dir, tmp_path, capsys, monkeypatch):
    import mechun.io

    monkeypatch.setattr(mechun.io, "free_bytes", lambda path: 10_000)
    t0 = time.time()
    refused(capsys, tmp_path, ["rmu", "--model", tiny_organism_dir, "--forget", "pathogen", "--steps", "50",
                               "--out", tmp_path / "rmu"], "MB free")
    assert not (tmp_path / "rmu").exists() and time.time() - t0 < 30


def test_concurrent_saves_to_one_path_never_mix(tmp_path):
    from mechun import ResidualCache
    from mechun.io import temp_sibling

    assert temp_sibling(tmp_path / "x") != temp_sibling(tmp_path / "x")
    path = tmp_path / "c.safetensors"
    caches = [ResidualCache(acts=torch.full((1, 200, 64), float(i)), layers=[0], hook_names=["h"],
                            fingerprint="test", positions="last", prompts=[str(i)] * 200) for i in range(6)]
    errors = []

    def save(c):
        try:
            c.save(path, overwrite=True)
        except OutputError:
            pass  # another writer's file appeared between the check and the write: refused, never mixed
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = ResidualCache.load(path)
    assert got.acts.unique().numel() == 1 and got.prompts[0] == str(int(got.acts[0, 0, 0]))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_a_temp_left_by_sigkill_is_cleaned_by_the_next_write(tmp_path):
    code = ("import os, signal, sys\nfrom mechun.io import atomic_file\n"
            f"with atomic_file({str(tmp_path / 'r.json')!r}) as t:\n"
            "    t.write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".r.json.mechun-")  # SIGKILL cannot be caught
    (tmp_path / "mine.txt").write_text("a user's file")
    from mechun.io import write_json

    write_json(tmp_path / "r.json", {"ok": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "r.json"]


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path):
    exe = Path(sys.executable).parent / "mechun"
    out = tmp_path / "org"
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit that: give the
    # command the default disposition a user's terminal gives it.
    proc = subprocess.Popen([str(exe), "organism", "train", "--preset", "tiny", "--no-cache", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "training organism" not in seen and proc.poll() is None:  # interrupt the work, not the imports
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = seen + err
    assert proc.returncode == 130, err
    assert "mechun: interrupted" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# -- damaged checkpoints ----------------------------------------------------------------------------------------------
def _rewrite_weights(ckpt: Path, change) -> None:
    w = load_file(ckpt / "model.safetensors")
    save_file(change(w), ckpt / "model.safetensors", metadata={"format": "pt"})


def test_weights_missing_a_layer_are_refused(victim, tmp_path, capsys):
    _rewrite_weights(victim, lambda w: {k: v for k, v in w.items() if ".h.1." not in k})
    refused(capsys, tmp_path, ["eval", "--model", victim], "missing keys", "victim")


def test_unexpected_weights_are_refused(victim, tmp_path, capsys):
    _rewrite_weights(victim, lambda w: {**w, "transformer.h.9.mlp.c_fc.weight": torch.zeros(2, 2)})
    refused(capsys, tmp_path, ["eval", "--model", victim], "unexpected keys")


def test_nan_weights_are_refused(victim, tmp_path, capsys):
    def nan(w):
        k = next(k for k in w if "mlp.c_fc.weight" in k)
        w[k] = w[k].clone()
        w[k][0, 0] = float("nan")
        return w

    _rewrite_weights(victim, nan)
    refused(capsys, tmp_path, ["eval", "--model", victim], "NaN")


def test_truncated_weights_are_refused(victim, tmp_path, capsys):
    data = (victim / "model.safetensors").read_bytes()
    (victim / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(capsys, tmp_path, ["eval", "--model", victim], "damaged")


def test_deleted_tokenizer_is_refused(victim, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (victim / name).unlink()
    refused(capsys, tmp_path, ["eval", "--model", victim], "tokenizer")


def test_checkpoint_without_config_is_refused(victim, tmp_path, capsys):
    (victim / "config.json").unlink()
    refused(capsys, tmp_path, ["eval", "--model", victim], "no config.json")


def test_corrupt_world_json_is_refused(victim, tmp_path, capsys):
    (victim / "world.json").write_text('{"seed": 1, "subj')
    refused(capsys, tmp_path, ["eval", "--model", victim], "world.json", "not valid JSON")


def test_another_organisms_world_is_a_mismatch(tiny_organism_dir, tmp_path, capsys):
    from mechun import World

    World.generate(seed=4242, subjects_per_domain=4).save(tmp_path / "other.json")
    refused(capsys, tmp_path, ["eval", "--model", tiny_organism_dir, "--world", tmp_path / "other.json"],
            "differs from", "world.json")


def test_a_world_the_tokenizer_does_not_know_is_a_mismatch(tiny_model, tiny_world):
    from mechun import World

    with pytest.raises(ModelMismatchError, match="vocabulary lacks"):
        World.generate(seed=4242, subjects_per_domain=4).check_model(tiny_model)
    tiny_world.check_model(tiny_model)  # its own world passes


def test_truncated_cache_file_is_a_damaged_file_error(tiny_model, tiny_world, tmp_path):
    from mechun import ResidualCache, cache_residuals

    prompt = tiny_world.prompts("pathogen")[0].text
    path = cache_residuals(tiny_model, [prompt], layers=[0], progress=False).save(tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(DamagedFileError, match="damaged"):
        ResidualCache.load(path)


def test_a_foreign_safetensors_file_is_not_a_direction(victim):
    from mechun import Direction

    with pytest.raises(MechunError, match="not a mechun Direction"):
        Direction.load(victim / "model.safetensors")


def test_damaged_sae_dir_is_refused(tmp_path, tiny_organism_dir, capsys):
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text("{not json")
    refused(capsys, tmp_path, ["sae", "unlearn", "--model", tiny_organism_dir, "--sae", sae, "--forget", "pathogen"],
            "sae")


def test_an_sae_of_another_width_is_a_mismatch(tiny_model, tiny_organism_dir, tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    from mechun.sae import save_sae

    d = int(tiny_model.cfg.d_model) + 3
    cfg = StandardSAEConfig(d_in=d, d_sae=16)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae = StandardSAE(cfg)
    save_sae(sae, tmp_path / "sae")
    refused(capsys, tmp_path, ["sae", "unlearn", "--model", tiny_organism_dir, "--sae", tmp_path / "sae",
                               "--forget", "pathogen"], f"d_in={d}", "another model")


# -- bad inputs -------------------------------------------------------------------------------------------------------
def test_out_of_vocabulary_answer_names_the_word_and_a_spelling(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    wrong = next(v for v in tiny_world.facts if v.relation == fact.relation and v.answer != fact.answer).answer
    p = tiny_world.prompts(facts=[fact])[0].text
    line = refused(capsys, tmp_path, ["localize", "--model", tiny_organism_dir, "--method", "activation-patching",
                                      "--clean", p, "--corrupt", p, "--answer", fact.answer.capitalize(), "--wrong",
                                      wrong, "--out", tmp_path / "x.json"], "not in the model's vocabulary")
    assert f"did you mean {fact.answer!r}" in line


def test_out_of_vocabulary_subject_in_causal_tracing(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    refused(capsys, tmp_path, ["localize", "--model", tiny_organism_dir, "--method", "causal-tracing", "--prompt",
                               tiny_world.prompts(facts=[fact])[0].text, "--subject", "Zorbax", "--answer",
                               fact.answer], "'Zorbax'", "vocabulary")


def test_out_of_vocabulary_new_answer_is_refused_before_training(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    refused(capsys, tmp_path, ["edit", "--model", tiny_organism_dir, "--relation", fact.relation, "--subjects",
                               fact.subject, "--mode", "edit", "--new-answer", "Contact!", "--out", tmp_path / "e"],
            "--new-answer", "vocabulary")


def test_prompt_with_unknown_words_is_refused(tiny_organism_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("what is the capital of France\n")
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", tmp_path / "p.txt", "--out",
                               tmp_path / "c.safetensors"], "vocabulary lacks")


def test_prompt_longer_than_the_context_is_refused(tiny_model, tiny_organism_dir, tiny_world, tmp_path, capsys):
    word = tiny_world.facts[0].answer
    (tmp_path / "p.txt").write_text(" ".join([word] * (int(tiny_model.cfg.n_ctx) + 5)) + "\n")
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", tmp_path / "p.txt", "--out",
                               tmp_path / "c.safetensors"], "context", "shorten")


def test_non_utf8_prompt_file_is_refused(tiny_organism_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes("caf\xe9 latin-1\n".encode("latin-1"))
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", tmp_path / "p.txt", "--out",
                               tmp_path / "c.safetensors"], "not UTF-8")


def test_empty_prompt_file_is_refused(tiny_organism_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n \n")
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", tmp_path / "p.txt", "--out",
                               tmp_path / "c.safetensors"], "no prompts")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_before_loading(device, tiny_organism_dir, prompts, tmp_path, capsys):
    refused(capsys, tmp_path, ["cache", "--model", tiny_organism_dir, "--prompts", prompts, "--device", device,
                               "--out", tmp_path / "c.safetensors"], "no CUDA GPU", "--device cpu")


def test_unknown_device_is_refused(tiny_organism_dir, prompts, tmp_path, capsys):
    refused(capsys, tmp_path, ["eval", "--model", tiny_organism_dir, "--device", "gpu0"], "unknown device")


def test_edit_component_layer_out_of_range(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    refused(capsys, tmp_path, ["edit", "--model", tiny_organism_dir, "--relation", fact.relation, "--subjects",
                               fact.subject, "--components", "mlp:9", "--out", tmp_path / "e"], "out of range")


def test_unknown_forget_domain(tiny_organism_dir, tmp_path, capsys):
    refused(capsys, tmp_path, ["rmu", "--model", tiny_organism_dir, "--forget", "chemistry", "--out",
                               tmp_path / "r"], "chemistry")


def test_missing_and_file_model_paths(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(capsys, tmp_path, ["eval", "--model", tmp_path / "nope"], "nope")
    refused(capsys, tmp_path, ["eval", "--model", tmp_path / "f"], "is a file")


def test_patching_prompts_of_different_lengths(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    p = tiny_world.prompts(facts=[fact])[0].text
    refused(capsys, tmp_path, ["localize", "--model", tiny_organism_dir, "--method", "activation-patching",
                               "--clean", p, "--corrupt", p + " " + fact.answer, "--answer", fact.answer,
                               "--wrong", fact.answer], "tokens")


def test_subject_not_in_the_prompt(tiny_organism_dir, tiny_world, tmp_path, capsys):
    a, b = tiny_world.facts[0], next(f for f in tiny_world.facts if f.subject != tiny_world.facts[0].subject)
    refused(capsys, tmp_path, ["localize", "--model", tiny_organism_dir, "--method", "causal-tracing", "--prompt",
                               tiny_world.prompts(facts=[a])[0].text, "--subject", b.subject, "--answer", a.answer],
            "not found")


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tiny_organism_dir, tmp_path, capsys,
                                                                      monkeypatch):
    import mechun.evaluate

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(mechun.evaluate, "evaluate_world", boom)
    refused(capsys, tmp_path, ["eval", "--model", tiny_organism_dir], "unexpected KeyError", "--debug")
    code, _, err = run(capsys, "eval", "--model", tiny_organism_dir, "--debug")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("mechun: error:")


def test_keyboard_interrupt_in_process_is_130(tiny_organism_dir, tmp_path, capsys, monkeypatch):
    import mechun.evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mechun.evaluate, "evaluate_world", interrupted)
    code, _, err = run(capsys, "eval", "--model", tiny_organism_dir)
    assert code == 130 and err.startswith("mechun: interrupted") and "Traceback" not in err


# -- the library: inputs that used to give silent wrong results --------------------------------------------------------
def test_a_single_string_is_one_prompt(tiny_model, tiny_world):
    """TransformerLens reads one string as one prompt; so does mechun (it used to cache one prompt per letter)."""
    from mechun import cache_residuals

    prompt = tiny_world.prompts("pathogen")[0].text
    c = cache_residuals(tiny_model, prompt, layers=[0], progress=False)
    assert c.prompts == [prompt] and c.acts.shape[1] == 1
    assert torch.equal(c.acts, cache_residuals(tiny_model, [prompt], layers=[0], progress=False).acts)


def test_token_ids_outside_the_vocabulary(tiny_model):
    from mechun import cache_residuals

    with pytest.raises(MechunError, match="vocabulary"):
        cache_residuals(tiny_model, torch.tensor([[1, 10**6]]), layers=[0], progress=False)
    with pytest.raises(MechunError, match="vocabulary"):
        cache_residuals(tiny_model, torch.tensor([[-1, 2]]), layers=[0], progress=False)


@pytest.mark.parametrize("layers", [[2.5], [True], ["1"]])
def test_non_integer_layers_are_refused_not_rounded(tiny_model, layers):
    """Users get check_layer's MechunError; under this suite's jaxtyping/beartype checker the annotation
    (``Sequence[int]``) may refuse first. Either way the layer is never rounded to 2."""
    from jaxtyping import TypeCheckError

    from mechun import project_out

    with pytest.raises((MechunError, TypeCheckError)), project_out(tiny_model, torch.ones(tiny_model.cfg.d_model),
                                                                    layers=layers):
        pass


def test_count_hooks_ignores_the_libraries_own_hooks(tiny_model):
    from mechun import count_hooks, hooks, tokenize

    ids = tokenize(tiny_model, ["A B"])[0]
    tiny_model(ids)  # TransformerLens wires its own capture hooks on the first forward
    tiny_model.run_with_cache(ids)  # transformers installs output-capturing hooks
    assert count_hooks(tiny_model) == 0
    with hooks(tiny_model, [("blocks.0.hook_resid_post", lambda a: None)]):
        assert count_hooks(tiny_model) == 1
    assert count_hooks(tiny_model) == 0


def test_rmu_config_rejects_nan():
    from mechun.unlearn.rmu import RMUConfig

    for field in ("steering_coeff", "lr", "alpha"):
        with pytest.raises(MechunError, match=field):
            RMUConfig(["pathogen"], **{field: float("nan")})
    with pytest.raises(MechunError, match="batch_size"):
        RMUConfig(["pathogen"], batch_size=0)


def test_loading_an_intact_checkpoint_still_works(victim):
    """The load checks pass an intact checkpoint (and a damaged one raises the typed error)."""
    from mechun import load_model

    assert int(load_model(victim, device="cpu").cfg.n_layers) >= 2
    (victim / "tokenizer.json").unlink()
    (victim / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError):
        load_model(victim, device="cpu")


# -- found by a second pair of eyes trying the command as a new user ---------------------------------------------------
@pytest.mark.parametrize("config", ['{"n_layer": ', None], ids=["bad-json", "bad-field"])
def test_damaged_config_json_is_named(victim, tmp_path, capsys, config):
    cfg = victim / "config.json"
    if config is None:
        config = json.dumps({**json.loads(cfg.read_text()), "n_layer": "three"})
    cfg.write_text(config)
    line = refused(capsys, tmp_path, ["eval", "--model", victim], "damaged")
    assert "hub name" not in line and "unexpected" not in line


def test_a_steering_vector_of_the_wrong_size_is_named(victim, tmp_path, capsys):
    (victim / "rmu.json").write_text(json.dumps({"forget_domain": "pathogen", "config": {"layer": 1},
                                                 "steering_vectors": {"pathogen": [0.1] * 10}}))
    refused(capsys, tmp_path, ["junk", "--base", victim, "--unlearned", victim, "--out", tmp_path / "j"],
            "rmu.json", "steering vector")


def test_the_same_model_as_base_and_unlearned_is_named(tiny_organism_dir, tmp_path, capsys):
    refused(capsys, tmp_path, ["junk", "--base", tiny_organism_dir, "--unlearned", tiny_organism_dir, "--forget",
                               "pathogen", "--out", tmp_path / "j"], "same checkpoint")


def test_a_world_with_a_bogus_domain_is_damaged(victim, tmp_path, capsys):
    w = json.loads((victim / "world.json").read_text())
    w["facts"][0]["domain"] = "bogus"
    (victim / "world.json").write_text(json.dumps(w))
    refused(capsys, tmp_path, ["eval", "--model", victim], "world.json", "damaged")


def test_a_fifo_is_not_a_world_file(tiny_organism_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "w.json")
    refused(capsys, tmp_path, ["eval", "--model", tiny_organism_dir, "--world", tmp_path / "w.json"],
            "not a regular file")


@pytest.mark.parametrize("argv, option", [
    (["sae", "train", "--model", NOPE, "--layer", "1", "--architecture", "topk", "--d-sae", "8", "--k", "16"], "--k"),
    (["organism", "train", "--preset", "tiny", "--seed", "99999999999999999999"], "--seed"),
    (["edit", "--model", NOPE, "--relation", "sport", "--subjects", " ; "], "--subjects"),
], ids=["topk-k", "seed", "subjects"])
def test_more_usage_errors_before_any_work(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and option in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_file_out_in_a_new_folder_is_written(tiny_organism_dir, prompts, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "c.safetensors"
    code, _, err = run(capsys, "cache", "--model", tiny_organism_dir, "--prompts", prompts, "--layers", "0",
                       "--out", out)
    assert code == 0 and out.is_file(), err


def test_a_multi_token_answer_is_refused_in_causal_tracing(tiny_organism_dir, tiny_world, tmp_path, capsys):
    fact = _fact(tiny_world)
    refused(capsys, tmp_path, ["localize", "--model", tiny_organism_dir, "--method", "causal-tracing", "--prompt",
                               tiny_world.prompts(facts=[fact])[0].text, "--subject", fact.subject, "--answer",
                               f"{fact.answer} {fact.answer}"], "2 tokens", "first token")


def test_more_sae_features_than_the_sae_has(tiny_organism_dir, tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    from mechun.models import load_model
    from mechun.sae import save_sae

    cfg = StandardSAEConfig(d_in=int(load_model(tiny_organism_dir, device="cpu").cfg.d_model), d_sae=8)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    save_sae(StandardSAE(cfg), tmp_path / "sae")
    refused(capsys, tmp_path, ["sae", "unlearn", "--model", tiny_organism_dir, "--sae", tmp_path / "sae",
                               "--forget", "pathogen", "--n", "100"], "--n 100", "8 features")


def test_a_cache_location_that_is_a_file_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "cachefile").write_text("mine")
    monkeypatch.setenv("MECHUN_CACHE", str(tmp_path / "cachefile"))
    refused(capsys, tmp_path, ["organism", "train", "--preset", "tiny", "--out", tmp_path / "o"], "MECHUN_CACHE")


def test_an_unreadable_manifest_is_not_trusted(tmp_path, capsys):
    out = tmp_path / "R"
    out.mkdir()
    (out / ".mechun-manifest.json").write_text('{"files": ')
    (out / "results.json").write_text("data")
    refused(capsys, tmp_path, ["reproduce", "organism", "--quick", "--out", out, "--overwrite"],
            "no readable .mechun-manifest.json")
