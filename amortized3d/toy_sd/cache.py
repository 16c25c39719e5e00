"""The toy SD built once per config: ``<cache root>/toy_sd/<digest>/``, like CI's virtualenv.

The root is ``$AMORTIZED3D_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/amortized3d`` (outside the clone, so
fresh clones and CI reuse it). A build goes to a temporary sibling directory that is renamed into place
when complete (``toy_sd.json`` is written last), so an interrupted build never looks finished, and two
concurrent builders leave one complete copy.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from amortized3d.toy_sd.config import ToySDConfig

COMPLETE_MARKER = "toy_sd.json"


def cache_root() -> Path:
    if os.environ.get("AMORTIZED3D_CACHE"):
        return Path(os.environ["AMORTIZED3D_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "amortized3d"


def cached_path(cfg: ToySDConfig, root: Path | None = None) -> Path:
    return (root or cache_root()) / "toy_sd" / cfg.digest()


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "model_index.json").is_file()


def ensure_toy_sd(cfg: ToySDConfig | None = None, root: Path | None = None, progress=None) -> Path:
    """The directory of the toy SD of ``cfg``: from the cache, else trained now (minutes) and cached."""
    from amortized3d.toy_sd.train import train_toy_sd

    cfg = cfg or ToySDConfig()
    root = root or cache_root()
    final = cached_path(cfg, root)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        train_toy_sd(cfg, tmp, cache_dir=str(root), progress=progress)
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # a damaged entry (a partial copy by hand): replaced
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # another builder won the race with a complete copy: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
