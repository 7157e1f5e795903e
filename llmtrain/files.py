"""Writing files safely: fsync before a rename publishes them, and a full disk said plainly;
and `regular_file`, which names what stands where a file to read was expected.

A full disk shows up in different clothes: OSError ENOSPC or EDQUOT from Python's own writes,
"No space left on device (os error 28)" from safetensors, and from torch.save a bare
`RuntimeError: [enforce fail at inline_container.cc:...]` that names no cause at all. So after a
failed write, `is_disk_full` also asks the file system itself (free space, and a small probe
write) before calling it a full disk.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from llmtrain.errors import DiskFullError

FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
LOW_SPACE = 1 << 20  # under this many free bytes after a failed write, the disk was full
PROBE = 64 << 10


def regular_file(path: str | Path, kind: str, missing: str, error: type[Exception]) -> Path:
    """`path` as a Path when it names a regular file; else `error` saying what is there instead
    (a directory; a device, pipe or socket; nothing). `kind` is what the file should be ("a
    JSONL data file"), `missing` how a missing one is named ("data file" not found)."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{p}: is a directory, not {kind}")
    if p.exists() and not p.is_file():
        raise error(f"{p}: not a regular file (a device, pipe or socket), not {kind}")
    if not p.is_file():
        raise error(f"{missing} not found: {p}")
    return p


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path`."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    s = os.statvfs(p)
    return s.f_bavail * s.f_frsize


def _probe_fails(folder: Path) -> bool:
    """Does writing PROBE bytes into `folder` fail for lack of space (or quota)?"""
    p = folder / f".llmtrain-space-probe-{os.getpid()}"
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        return e.errno in FULL_ERRNOS
    try:
        os.write(fd, b"\0" * PROBE)
        os.fsync(fd)
        return False
    except OSError as e:
        return e.errno in FULL_ERRNOS
    finally:
        os.close(fd)
        try:
            os.unlink(p)
        except OSError:
            pass


def is_disk_full(exc: BaseException, path: str | Path) -> bool:
    """Was `exc`, raised while writing `path`, caused by a full disk or an exhausted quota?"""
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    if any(w in str(exc).lower() for w in FULL_WORDS):
        return True
    if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
        return False  # e.g. KeyboardInterrupt, or a bug: not the disk's doing
    folder = Path(path).parent
    try:
        return free_bytes(folder) < LOW_SPACE or (folder.is_dir() and _probe_fails(folder))
    except OSError:
        return False


def disk_full(path: str | Path, removed: str = "") -> DiskFullError:
    msg = f"no space left on device while writing {path}"
    return DiskFullError(msg + (f"; {removed}" if removed else ""))


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (files created or renamed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform without directory handles (Windows): nothing to sync
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root`, then `root` itself."""
    for dirpath, _, names in os.walk(root):
        for n in names:
            fsync_file(Path(dirpath) / n)
        fsync_dir(dirpath)


def remove(path: str | Path) -> None:
    """Remove a file or folder if it is there; never raises for one already gone."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def write_file(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file beside it and `publish`:
    a kill or a power cut leaves the old file or the new one; a failed write leaves no temporary
    file behind, and a full disk is a one-line DiskFullError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        publish(tmp, path)
    except OSError as e:
        full = is_disk_full(e, tmp)  # asked before the partial file goes: it is what filled the disk
        remove(tmp)
        if full:
            raise disk_full(path, "it was left as it was") from None
        raise


def publish(tmp: str | Path, final: str | Path) -> None:
    """Rename a fully written `tmp` (a file or a folder) to `final`, durably: its bytes (every
    file of a folder) are fsynced before the rename, and the parent folder after it, so a power
    cut leaves the old `final` or the whole new one, never an empty or partial file."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
