"""Every notebook runs top to bottom (on the session's tiny organism, so it stays quick) without a warning or a
dependency's progress bar in its outputs; the committed notebooks carry their outputs (``make notebooks``, on the
main organism) and those are clean too."""

import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "notebooks"))
from execute import noise, notebooks  # noqa: E402

NOTEBOOKS = notebooks()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_clean_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "run `make notebooks` to save the notebook with its outputs"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2
    assert not noise(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_cleanly(path, tiny_organism_dir, tmp_path):
    from execute import execute

    nb = execute(path, tiny_organism_dir, tmp_path)
    assert not noise(nb)
