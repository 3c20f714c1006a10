"""Files that survive a crash: written whole under a temporary name, forced to disk, renamed.

A rename is atomic, but only reaches the disk once the folder itself is synced; data renamed over a
target before it was synced can come back empty after a power cut. Every file stream-redact
replaces as a whole (users, manifests, reports) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable; a filesystem that cannot sync a folder is let be (the
    rename itself has happened)."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a new file ``path`` (never over an existing one) and force it to disk;
    ``mode`` is set before any byte is written (0o600 for secrets). OSError as it comes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)  # the umask may have taken bits away; never added any
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes, mode: int | None = None, suffix: str = ".tmp") -> None:
    """``path`` is either complete or untouched: temp file beside it, fsync, rename, fsync the folder.
    OSError as it comes; the temp file never stays behind."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
    try:
        write_synced(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
