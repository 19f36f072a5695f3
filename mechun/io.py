"""Writing results safely: what mechun writes it writes whole, and what it did not write it never replaces.

The rules every writer in mechun follows (the README's "Errors and safety" says the same to users):

* **Whole or nothing.** A file is written under a unique hidden temp name beside it and renamed into place
  (:func:`atomic_file`); an output directory is filled as a hidden temp dir and renamed into place
  (:func:`atomic_dir`), or -- for a long analysis that writes as it goes -- filled in place and removed again if the
  run fails (:func:`run_dir`). A crash, Ctrl-C or a full disk leaves the previous output or none, never half of one.
* **Unique temp names.** A temp name carries the host, the process id and a random part
  (``.NAME.mechun-HOST-PID-RAND.tmp``), so two writers of one path never share a temp file. A temp left behind by a
  killed process (SIGKILL cannot be caught) is removed by the next mechun write in that directory, once no process
  of that id runs on this host.
* **A manifest of what was written.** Every output directory ends with ``.mechun-manifest.json``: each file mechun
  wrote there, with its size and modification time.
* **Replace only what mechun wrote, and only when asked.** An existing non-empty output is replaced only with
  ``overwrite=True`` (``--overwrite``) and only if every file in it is listed, unchanged, in its manifest; a file
  mechun did not write (or one changed since) makes the command refuse and name it. Nothing is ever deleted to make
  room for an output that could not be verified as mechun's own.
* **Checked before the work.** :func:`check_out_dir` / :func:`check_out_file` run before any model is loaded: the
  path's directory must be writable and, where the size is known, the disk must have room.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechun.errors import DamagedFileError, MechunError, OutputError

MANIFEST = ".mechun-manifest.json"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.mechun-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{8}\.(tmp|old)$")


# -- temp names ------------------------------------------------------------------------------------------------------
def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``path`` that no other writer (process, thread or host) uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.mechun-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: str | Path) -> list[Path]:
    """Remove the temp files and dirs that killed mechun processes of this host left in ``parent``; return them.

    Only names of mechun's own temp pattern are touched, and only when their process no longer runs."""
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for p in Path(parent).iterdir():
            m = _TEMP_RE.match(p.name)
            if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _ordinary_permissions(path: Path) -> None:
    """Temp dirs/files are created owner-only; published outputs get the user's usual permissions."""
    umask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for p in path.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


# -- files -----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write(tmp)``: ``p`` appears only once the body has finished writing ``tmp``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as output dirs do
    clean_stale_temps(path.parent)
    tmp = temp_sibling(path)
    try:
        yield tmp
        _ordinary_permissions(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def save_tensors(path: str | Path, tensors: dict[str, Tensor], key: str, header: dict) -> Path:
    """A safetensors file whose metadata ``key`` holds ``header`` (JSON), written atomically."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={key: json.dumps(header)})
    return Path(path)


def tensors_header(path: str | Path, key: str) -> dict | None:
    """The mechun header under ``key`` of a safetensors file, or None if it is not one (or not readable)."""
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(key)
        return json.loads(raw) if raw is not None else None
    except (OSError, SafetensorError, ValueError):
        return None


def load_tensors(path: str | Path, key: str, what: str) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(key)
        if raw is None:
            raise MechunError(f"{path} is a safetensors file but not a mechun {what} (no {key!r} header)")
        return load_file(str(path)), json.loads(raw)
    except (SafetensorError, json.JSONDecodeError, RuntimeError) as e:
        raise DamagedFileError(f"{path} is damaged (truncated or corrupt: {str(e).splitlines()[0]}); "
                               f"recreate the {what}") from e


# -- checks before work ----------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, option: str = "--out") -> None:
    """Refuse a path that cannot be created or replaced: its nearest existing directory (the path itself if it is
    one, else its parent's) cannot be written -- read-only, no permission, or a file in the way."""
    path = Path(path)
    anc = _nearest_existing(path if path.is_dir() else path.parent)
    if not anc.is_dir():
        raise OutputError(f"{option} {path}: {anc} is a file, so nothing can be created under it; choose another "
                          f"{option}")
    probe = temp_sibling(anc / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {anc} ({e.strerror}); choose a {option} on a writable "
                          "disk") from e


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(_nearest_existing(Path(path))).free


def check_free_space(path: str | Path, need: int, what: str, option: str = "--out") -> None:
    """Refuse before the work when the disk holding ``path`` has less than ``need`` bytes free."""
    free = free_bytes(path)
    if need > free:
        raise OutputError(f"{option} {path}: {what} needs about {need / 1e6:.1f} MB but the disk has "
                          f"{free / 1e6:.1f} MB free; free some space or choose another {option}")


def _listing(root: Path) -> dict[str, list[int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or p.is_file():
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    out.pop(MANIFEST, None)
    return out


def write_manifest(root: str | Path, kind: str, complete: bool = True) -> Path:
    """Record every file under ``root`` as written by mechun (``kind`` says what the dir is)."""
    from mechun import __version__

    root = Path(root)
    data = {"mechun": __version__, "kind": kind, "complete": complete, "host": _HOST, "pid": os.getpid(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _listing(root) if complete else {}}
    return write_json(root / MANIFEST, data)


def read_manifest(root: str | Path) -> dict | None:
    try:
        data = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def foreign_files(root: str | Path) -> list[str]:
    """Files under ``root`` that its manifest does not list as mechun's, unchanged (all of them without one)."""
    root = Path(root)
    listed = (read_manifest(root) or {}).get("files", {})
    return [rel for rel, stat in _listing(root).items() if listed.get(rel) != stat]


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_out_dir(out: str | Path, overwrite: bool = False, option: str = "--out", need_bytes: int = 0) -> Path:
    """Before any work: ``out`` may be written as an output directory.

    New or empty: yes. Non-empty: only with ``overwrite`` and only if it is a complete earlier mechun output whose
    files are all unchanged; otherwise an :class:`OutputError` names the problem and the fix."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"{option} {out} is an existing file; mechun writes a new directory there and never "
                              f"replaces a file; choose a new {option}")
        if not _is_empty_dir(out):
            if not overwrite:
                raise OutputError(f"{option} {out} exists and is not empty; choose a new {option}, or pass "
                                  "--overwrite to replace an earlier mechun output there")
            _check_replaceable(out, option)
    return _check_room(out, option, need_bytes)


def _check_room(out: Path, option: str, need_bytes: int) -> Path:
    check_writable(out, option)
    if need_bytes:
        check_free_space(out, need_bytes, "the output", option)
    return out


def _check_replaceable(out: Path, option: str) -> None:
    manifest = read_manifest(out)
    if manifest is None:
        raise OutputError(f"{option} {out} was not written by mechun (no readable {MANIFEST}); --overwrite "
                          f"replaces only mechun's own output; choose a new {option}")
    if not manifest.get("complete", True):
        pid = manifest.get("pid")
        state = "still running" if manifest.get("host") == _HOST and pid and _alive(int(pid)) else "interrupted"
        raise OutputError(f"{option} {out} holds an {state} mechun run (process {pid}); its files cannot be "
                          f"verified as mechun's; remove {out} yourself or choose a new {option}")
    foreign = foreign_files(out)
    if foreign:
        raise OutputError(f"{option} {out}: {foreign[0]} was not written by mechun (or changed since); "
                          f"--overwrite never deletes such files; move it away or choose a new {option}")


def check_out_file(out: str | Path, overwrite: bool = False, is_mine: Callable[[Path], bool] | None = None,
                   option: str = "--out", need_bytes: int = 0) -> Path:
    """Before any work: ``out`` may be written as an output file. An existing file is replaced only with
    ``overwrite`` and only if ``is_mine(out)`` says mechun wrote it (a checkpoint's weights never are)."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{option} {out} is a directory; pass a file path")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"{option} {out} already exists; choose a new {option}, or pass --overwrite to "
                              "replace a file mechun wrote")
        if out.is_symlink() or is_mine is None or not is_mine(out):
            raise OutputError(f"{option} {out} was not written by mechun; --overwrite replaces only mechun's own "
                              f"files; choose a new {option}")
    return _check_room(out, option, need_bytes)


# -- output directories ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(out: str | Path, kind: str, overwrite: bool = False, need_bytes: int = 0) -> Iterator[Path]:
    """``with atomic_dir(out, "checkpoint") as tmp: write into tmp``: ``out`` appears whole, with a manifest, once
    the body has finished; if it fails nothing is left. With ``overwrite`` an earlier mechun output at ``out`` is
    replaced (checked by :func:`check_out_dir`); it stays as it was if the body fails."""
    out = check_out_dir(out, overwrite, need_bytes=need_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)
    tmp = temp_sibling(out)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        write_manifest(tmp, kind)
        _ordinary_permissions(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    if _is_empty_dir(out):
        out.rmdir()
    if out.exists():
        _check_replaceable(out, "--out")  # again: something may have changed during the work
        old = temp_sibling(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def run_dir(out: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """An output directory filled in place by a long analysis (which records its own paths in its results).

    ``out`` is checked as by :func:`check_out_dir`. An earlier mechun output there (with ``overwrite``) is moved
    aside first and removed once the run succeeds, or put back if it fails. A failed run removes what it wrote.
    While running, the manifest says the run is incomplete; at the end it lists every file."""
    out = check_out_dir(out, overwrite)
    existed = out.exists()
    old = None
    if existed and not _is_empty_dir(out):
        old = temp_sibling(out, "old")
        out.rename(old)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, kind, complete=False)
    try:
        yield out
        write_manifest(out, kind)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            old.rename(out)
        elif existed:
            out.mkdir(exist_ok=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
