"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every writer of the project (checkpoints, metrics, images, videos, meshes, the embedding cache,
downloaded corpora) goes through :func:`atomic_path`:

1. the bytes go to a temp file in the target's own directory (``os.replace`` is atomic only within
   one filesystem), named ``.<name>.<random>.<pid>.tmp`` so that ``run_guard.clean_stale_temp_files``
   can tell a killed writer's leftovers (dead pid) from a live writer's;
2. the temp file is fsync'ed, then moved over the target with ``os.replace`` (atomic on POSIX and
   Windows), and the directory entry is fsync'ed so the rename itself survives a power loss;
3. on any error (also ``KeyboardInterrupt``) the temp file is removed and the target is untouched;
   a full disk is re-raised as ``OSError(ENOSPC)`` naming the target and the free space left.

Unique random part: two writers of the same target in one process (threads) never share a temp file.
Not ``mkstemp``: its 0600 mode would survive the rename; a plain ``open`` keeps the usual umask.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; publish it onto ``path`` if the block succeeds.

    ``keep_suffix``: the temp name ends in ``path``'s suffix too (``....tmp.mp4``), for writers that
    pick the format from the file name (such temp files are not matched by the stale-file cleanup).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.{os.getpid()}.tmp"
                           + (target.suffix if keep_suffix else ""))
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        nospace = disk_full_error(err, target)
        if nospace is not None:
            raise nospace from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(fileobj)`` on a binary temp file next to ``path`` and atomically move it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return Path(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync flushes the file's data whichever descriptor asks
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the file itself was synced
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- full disks
def _is_enospc(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:  # torch wraps the OSError of a failed write() in
        seen.add(id(err))                           # "inline_container.cc ... unexpected pos" (or vice versa)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(err: BaseException, path: str | os.PathLike) -> OSError | None:
    """``OSError(ENOSPC)`` naming ``path`` when ``err`` is (or hides) a full disk, else None.

    torch reports a failed write of its zip archive as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; that, with (almost) no free space left on the target's
    filesystem, is a full disk too.
    """
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    path = Path(path)
    free = _free_bytes(path.parent)
    torch_write_failed = isinstance(err, RuntimeError) and "unexpected pos" in str(err)
    if not (_is_enospc(err) or (torch_write_failed and free is not None and free < (1 << 20))):
        return None
    where = f"{free} bytes free on the filesystem of {path.parent}" if free is not None else "free space unknown"
    return OSError(errno.ENOSPC, f"no space left on device writing {path} ({where}); free some space or point "
                                 "the output/cache directory elsewhere (paths.output_dir, paths.cache_dir)")


def _free_bytes(directory: Path) -> int | None:
    for d in (directory, *directory.parents):  # the nearest directory that exists
        if d.is_dir():
            try:
                return shutil.disk_usage(d).free
            except OSError:
                return None
    return None
