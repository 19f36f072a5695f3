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


@pytest.fixture(scope="session")
def executed_notebooks(request, tiny_organism_dir, tmp_path_factory) -> dict:
    """The selected notebooks, executed on the tiny organism two at a time (:func:`execute.execute_many`)."""
    from execute import execute_many

    chosen = [item.callspec.params["path"] for item in request.session.items
              if item.originalname == "test_notebook_executes_cleanly"]
    return execute_many(chosen, tiny_organism_dir, tmp_path_factory.mktemp("notebooks"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_cleanly(path, executed_notebooks):
    nb = executed_notebooks[path]
    assert not isinstance(nb, str), nb
    assert not noise(nb)


def test_progress_bars_are_text_outside_jupyter_and_widgets_inside(monkeypatch):
    import io

    from tqdm.notebook import tqdm as widget_bar
    from tqdm.std import tqdm as text_bar

    import mechun.progress as progress

    assert not progress.in_notebook()
    bar = progress.progress_bar(total=2, file=io.StringIO())
    assert type(bar) is text_bar
    bar.close()
    monkeypatch.setattr(progress, "in_notebook", lambda: True)  # as inside a Jupyter kernel with ipywidgets
    monkeypatch.setattr(progress, "_widgets_available", lambda: True)
    bar = progress.progress_bar(total=2, disable=False)
    assert isinstance(bar, widget_bar)
    bar.close()


def test_quiet_dependencies_restores_the_users_settings():
    from transformers.utils import logging as tlog

    from mechun.progress import quiet_dependencies

    tlog.set_verbosity_info()
    tlog.enable_progress_bar()
    try:
        with quiet_dependencies():
            assert tlog.get_verbosity() == tlog.ERROR and not tlog.is_progress_bar_enabled()
        assert tlog.get_verbosity() == tlog.INFO and tlog.is_progress_bar_enabled()
    finally:
        tlog.set_verbosity_warning()
