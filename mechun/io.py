"""Atomic safetensors files with a JSON header: what caches and directions are saved as."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechun.errors import MechunError


def save_tensors(path: str | Path, tensors: dict[str, Tensor], key: str, header: dict) -> Path:
    """Write to ``PATH.partial`` and rename, so a failure never leaves a half-written file at ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={key: json.dumps(header)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_tensors(path: str | Path, key: str, what: str) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(key)
    if raw is None:
        raise MechunError(f"{path} is a safetensors file but not a mechun {what} (no {key!r} header)")
    return load_file(str(path)), json.loads(raw)


def check_new_dir(out: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output path that is a file or a non-empty dir: mechun never replaces what it
    did not write."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new {option}")
    return out
