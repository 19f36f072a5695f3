"""Execute the notebooks top to bottom and (``make notebooks``) save them with their outputs.

``make notebooks`` runs every notebook here on the main organism (trained once per machine if the cache lacks it,
about 10 min on 2 cores) and writes each back whole, outputs included, so that the repository shows figures and
numbers. Outputs are stable from run to run: every notebook seeds what it trains, execution timestamps are not
recorded, and the kernel is a fresh one per notebook. The test suite runs the same function on the tiny organism
without saving (tests/test_notebooks.py), and both check that no output carries a warning or a dependency's
progress bar (:func:`noise`).

    python notebooks/execute.py [NOTEBOOK ...]      # default: every notebook in this folder

:func:`execute_many` runs several notebooks at once, each in a process and kernel of its own with one thread (the
test suite's way).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: What must never appear in a committed or freshly executed output: warnings, and other libraries' progress bars
#: or chatter (tqdm's text bars end in "it/s]" or "s/it]").
NOISE = re.compile(r"Warning|WARNING|warn\(|IProgress|Loading weights|Writing model shards|attention_mask|"
                   r"loss_type|\d+it/s\]|s/it\]")


def notebooks() -> list[Path]:
    return sorted(HERE.glob("*.ipynb"))


def noise(nb) -> list[str]:
    """Every output text of ``nb`` that carries a warning or a dependency's progress bar or log line (empty = clean).
    Error outputs count too."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.output_type == "error":
                found.append(f"cell {i}: error {out.get('ename')}: {out.get('evalue')}")
                continue
            texts = [out.get("text", "")] if out.output_type == "stream" else [
                v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)]
            for text in texts:
                for line in str(text).splitlines():
                    if NOISE.search(line) and not line.lstrip().startswith("<"):  # markup of a mechun repr is no noise
                        found.append(f"cell {i} ({out.get('name', out.output_type)}): {line[:160]}")
                if out.output_type == "stream" and out.get("name") == "stderr":
                    found.append(f"cell {i} (stderr): {str(text)[:160]}")
    return found


def execute(path: str | Path, organism: str | Path, workdir: str | Path, timeout: int = 1200):
    """Run the notebook at ``path`` in a fresh kernel on ``organism`` (``$MECHUN_ORGANISM``), with ``workdir`` as
    its working and output dir; returns the executed notebook (nothing is written)."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {"MECHUN_ORGANISM": str(organism), "MECHUN_NOTEBOOK_OUT": str(workdir), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        # a local socket, not TCP: no "running over TCP without encryption" warning, nothing listening on a port
        km = KernelManager(kernel_name="python3", transport="ipc", connection_file=str(Path(workdir) / "kernel.json"))
        try:
            NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": str(workdir)}}).execute()
        finally:  # nbclient leaves a kernel it was given running: end it here, not at interpreter exit
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def execute_many(paths: list[Path], organism: str | Path, workdir: str | Path, workers: int = 2) -> dict:
    """Execute ``paths`` on ``organism``, ``workers`` at a time, each in a process of its own (a fresh kernel, as
    :func:`execute`) limited to one thread: on the tiny organism most of a notebook's time is single-threaded Python
    (imports, building the bridge, small ops), so two one-thread kernels on two cores finish well before the same
    notebooks one after the other. Returns path -> the executed notebook, or the failure's text (the end of the
    process's output) where a cell raised."""
    import subprocess
    import time

    import nbformat

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, results = list(paths), [], {}
    while pending or running:
        while pending and len(running) < workers:
            path = pending.pop(0)
            work = Path(workdir) / path.stem
            work.mkdir(parents=True, exist_ok=True)
            out = work / "executed.ipynb"
            proc = subprocess.Popen([sys.executable, __file__, "--one", str(path), str(organism), str(work), str(out)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running.append((path, proc, out))
        for item in [r for r in running if r[1].poll() is not None]:
            path, proc, out = item
            running.remove(item)
            log = proc.stdout.read()
            proc.stdout.close()
            results[path] = nbformat.read(out, as_version=4) if proc.returncode == 0 else \
                f"{path.name} failed (exit {proc.returncode}):\n{log[-4000:]}"
        time.sleep(0.2)
    return results


def save(nb, path: str | Path) -> None:
    """Write ``nb`` over ``path`` whole or not at all."""
    import nbformat

    from mechun.io import atomic_file

    nb.metadata.pop("widgets", None)  # widget state is per session, not content
    with atomic_file(path) as tmp:
        nbformat.write(nb, str(tmp))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:  # execute_many's worker: NOTEBOOK ORGANISM WORKDIR OUT
        import nbformat

        path, organism, work, out = argv[1:5]
        nbformat.write(execute(path, organism, work), out)
        return 0
    from mechun.organism.train import DEFAULT_PRESET, cached_organism

    paths = [Path(a) for a in argv] or notebooks()
    organism = cached_organism(DEFAULT_PRESET, 0)  # the main organism: trained once per machine
    failed = 0
    for path in paths:
        with tempfile.TemporaryDirectory(prefix="mechun-nb-") as work:
            print(f"executing {path.name} on {organism} ...", flush=True)
            nb = execute(path, organism, work)
        bad = noise(nb)
        if bad:
            failed += 1
            print(f"  not saved: {len(bad)} noisy or failed output(s):\n    " + "\n    ".join(bad[:10]))
            continue
        save(nb, path)
        print(f"  saved with outputs: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
