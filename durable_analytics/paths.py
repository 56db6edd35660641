"""Where queues live, and the checks that keep another user out of them.

Events hold personal data, and the default location sits in a world-writable temp directory,
so every directory we use must be a real directory (not a symlink), owned by us and not
writable by group or others; every file must be a regular file, owned by us, with one link.
Anything else is refused with `UnsafePathError` naming the path: we never chmod or chown a
path we do not own, and never follow a link another user could have planted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UnsafePathError

__all__ = [
    "DB_NAME",
    "FLUSH_LOCK_NAME",
    "INIT_LOCK_NAME",
    "check_private_file",
    "create_private_file",
    "ensure_private_dir",
]

DB_NAME = "queue.db"
#: Held by the one process that ships from this queue (see flusher.py).
FLUSH_LOCK_NAME = "flush.lock"
#: Held briefly while a process creates or migrates the schema.
INIT_LOCK_NAME = "init.lock"


def ensure_private_dir(path: Path, *, create_parents: bool = True) -> Path:
    """Create ``path`` (mode 0700) if missing and check it is safe to keep events in.

    :raises UnsafePathError: the path is a symlink, not a directory, owned by another user,
        or writable by group/others.
    """
    path = Path(os.path.abspath(path))
    if create_parents and not path.parent.exists():
        # Parents we create are private too; existing parents are the user's business.
        _makedirs_private(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePathError(
            f"cannot create queue directory {path}: {exc.strerror}", path=str(path)
        ) from exc
    _check_dir(path)
    return path


def _makedirs_private(path: Path) -> None:
    if path.exists() or path.is_symlink():
        return
    _makedirs_private(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePathError(
            f"cannot create directory {path}: {exc.strerror}", path=str(path)
        ) from exc


def _check_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafePathError(f"cannot stat {path}: {exc.strerror}", path=str(path)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"refusing queue directory {path}: it is a symlink", path=str(path))
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"refusing queue directory {path}: not a directory", path=str(path))
    _check_owner_and_mode(path, st)


def _check_owner_and_mode(path: Path, st: os.stat_result) -> None:
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafePathError(
            f"refusing {path}: owned by uid {st.st_uid}, not by this process (uid {euid}); "
            "set persistence_dir to a directory of your own",
            path=str(path),
        )
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"refusing {path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "it must be 0700 for directories, 0600 for files",
            path=str(path),
        )


def create_private_file(path: Path) -> None:
    """Create ``path`` as an empty 0600 file unless it exists, then check it.

    Pre-creating the database file is how it gets mode 0600: SQLite would create it 0644 minus
    umask, and its -wal and -shm files copy the database's mode.

    :raises UnsafePathError: see `check_private_file`.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePathError(f"cannot create {path}: {exc.strerror}", path=str(path)) from exc
    else:
        os.close(fd)
    check_private_file(path)


def check_private_file(path: Path, *, missing_ok: bool = False) -> None:
    """Check that ``path`` is a regular file we own, with one link and no group/other access.

    A file readable by others but owned by us is tightened to 0600 rather than refused.

    :raises UnsafePathError: symlink, not a regular file, hard-linked, foreign owner, or
        writable by group/others.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise UnsafePathError(f"{path} does not exist", path=str(path)) from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"refusing {path}: it is a symlink", path=str(path))
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"refusing {path}: not a regular file", path=str(path))
    if st.st_nlink > 1:
        # Two names for one SQLite file give each name its own journal: corruption.
        raise UnsafePathError(f"refusing {path}: it has {st.st_nlink} hard links", path=str(path))
    _check_owner_and_mode(path, st)
    if st.st_mode & 0o044:
        os.chmod(path, 0o600, follow_symlinks=False)
