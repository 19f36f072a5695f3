import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Trained organisms are cached per machine; tests use a cache of their own (fresh each session unless
# MECHUN_TEST_CACHE names one to keep, e.g. for quick local reruns).
os.environ["MECHUN_CACHE"] = os.environ.get("MECHUN_TEST_CACHE") or __import__("tempfile").mkdtemp(
    prefix="mechun-test-cache-")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_SEED = 123


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``mechun`` command in this process (``mechun.cli.main``, what the installed script calls), capturing
    stdout and stderr as a user sees them; usage errors (argparse's ``SystemExit``) become the exit status. Saves the
    seconds of start-up a subprocess costs; :func:`run_cli_process` is for where the process boundary matters."""
    import contextlib
    import io

    from mechun import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    proc = subprocess.CompletedProcess(["mechun", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"mechun {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_cli_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed ``mechun`` command in a new process, as a user would."""
    exe = Path(sys.executable).parent / "mechun"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mechun.cli"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mechun {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_organism_dir(tmp_path_factory) -> Path:
    """The tiny organism, trained once per session through the CLI (the acceptance command; in-process: the process
    boundary does not matter here, and a new process would cost its start-up)."""
    out = tmp_path_factory.mktemp("organism") / "tiny"
    run_cli("organism", "train", "--preset", "tiny", "--seed", str(TINY_SEED), "--out", str(out), "--no-progress")
    return out


@pytest.fixture(scope="session")
def tiny_oracle_dir(tiny_organism_dir) -> Path:
    """The tiny organism's retain oracle without ``pathogen`` (same world, seed and schedule), from the test cache."""
    from mechun.organism.train import cached_organism

    return cached_organism("tiny", TINY_SEED, progress=False, without="pathogen")


@pytest.fixture(scope="session")
def tiny_model(tiny_organism_dir):
    from mechun import load_model

    return load_model(tiny_organism_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_world(tiny_organism_dir):
    from mechun import World

    return World.load(tiny_organism_dir)


def weights_hash(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def warm(model) -> None:
    """One forward so the bridge registers its own internal hooks before hooks are counted."""
    model(torch.tensor([[1, 2, 3]]))
