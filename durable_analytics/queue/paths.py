"""Where queues live, and the checks that keep another user (and a network filesystem) out.

Events hold personal data, and the default location sits in a world-writable temp directory,
so every directory we use must be a real directory (not a symlink), owned by us and not
writable by group or others; every file must be a regular file, owned by us, with one link.
Anything else is refused with `UnsafePathError` naming the path: we never chmod or chown a
path we do not own, and never follow a link another user could have planted.

Two kinds of failure are told apart, because the client treats them differently:

- `UnsafePathError` (and `NetworkFilesystemError`): the path is wrong and will stay wrong
  until someone changes the configuration. The constructor raises it.
- `StorageUnavailableError`: the path is fine but the disk is full or read-only, or we lack
  permission to write there right now (``ENOSPC``, ``EROFS``, ``EDQUOT``, ``EACCES``,
  ``EPERM``, ``EIO``). The client keeps running, counts what it could not store and tries
  again later: a full disk must not take the host application down.

Network filesystems: SQLite's WAL mode needs shared memory and POSIX locks that only work
between processes of one host; NFS, SMB and friends corrupt a WAL database as soon as two
hosts share it, and their lock daemons are unreliable even on one host. The queue directory's
filesystem type is looked up in ``/proc/mounts`` (Linux; elsewhere nothing is detected) and a
network filesystem is refused with `NetworkFilesystemError`. Refusing, not warning: a warning
in a log nobody reads does not stop two pods that share an NFS volume from corrupting it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import filelock
import platformdirs

from ..errors import (
    ConfigurationError,
    NetworkFilesystemError,
    StorageUnavailableError,
    UnsafePathError,
)

__all__ = [
    "DB_NAME",
    "FLUSH_LOCK_NAME",
    "INIT_LOCK_NAME",
    "NETWORK_FILESYSTEMS",
    "check_local_filesystem",
    "check_private_file",
    "create_private_file",
    "ensure_private_dir",
    "file_size",
    "flush_lock",
    "lock_path_of",
    "network_filesystem",
    "owner_pid",
    "queue_files",
    "state_dir",
    "state_root",
    "wal_size",
    "writer_file_name",
]

#: The one file of a queue written by durable_analytics 0.1 (and read, never written, since).
DB_NAME = "queue.db"
#: One writing process's own queue file: events-<pid>-<16 hex>.db. The random part keeps a
#: reused process id from ever naming an older file; the pid is there for the operator.
WRITER_PREFIX = "events-"
#: Each writer's file has a lock file of the same stem, held (flock) for the writer's lifetime:
#: the kernel frees it when the process dies, which is how a flusher tells a dead owner.
LOCK_SUFFIX = ".lock"
#: Held by the one process that ships from this queue (see flusher.py).
FLUSH_LOCK_NAME = "flush.lock"
#: Held briefly while a process creates, migrates or quarantines the database.
INIT_LOCK_NAME = "init.lock"

#: The directory name under the platform's per-user state directory (`state_root`).
STATE_DIR_NAME = "durable-analytics"

#: errno values that mean "the storage can't take writes now", not "the path is unsafe".
_UNAVAILABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}
)

#: Filesystem types (as in /proc/mounts) on which the WAL queue is refused.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "9p",  # WSL2's Windows drives, VM shares: no reliable locks or shared mmap
        "davfs",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.davfs2",
        "fuse.juicefs",
    }
)

_MOUNTS = "/proc/mounts"


def state_root() -> Path:
    """The per-user state directory that holds the `state_dir` of every app.

    ``$XDG_STATE_HOME/durable-analytics`` (default ``~/.local/state/durable-analytics``) on
    Linux, ``~/Library/Application Support/durable-analytics`` on macOS,
    ``%LOCALAPPDATA%\\durable-analytics`` on Windows (platformdirs' ``user_state_path``).
    """
    return platformdirs.user_state_path(STATE_DIR_NAME, appauthor=False)


def state_dir(app_id: str) -> Path:
    """A queue directory for ``app_id`` that survives reboots: ``state_root() / app_id``.

    The default ``persistence_dir`` is in the temp directory, which many systems empty at
    boot (tmpfs, systemd-tmpfiles, ``PrivateTmp``); pass this one instead to keep unsent
    events across a reboot::

        Analytics(app_id="my-app", persistence_dir=durable_analytics.state_dir("my-app"))

    Nothing is created here: the client creates the directory (mode 0700) when it opens the
    queue. ``durable-analytics queues`` searches both the temp root and `state_root`.

    :raises ConfigurationError: ``app_id`` is not a valid app id (``[A-Za-z0-9._-]{1,128}``).
    """
    from ..config import APP_ID_RE  # config.py may come to import this module

    if not isinstance(app_id, str) or not APP_ID_RE.fullmatch(app_id) or app_id in (".", ".."):
        raise ConfigurationError("app_id", f"{app_id!r} must match [A-Za-z0-9._-]{{1,128}}")
    return state_root() / app_id


def _os_error(action: str, path: Path, exc: OSError) -> UnsafePathError | StorageUnavailableError:
    """Our error for a failed filesystem call: unavailable storage, or an unsafe path."""
    message = f"{action} {path}: {exc.strerror or exc}"
    if exc.errno in _UNAVAILABLE_ERRNOS:
        return StorageUnavailableError(message, path=str(path))
    return UnsafePathError(message, path=str(path))


def ensure_private_dir(path: Path, *, create_parents: bool = True) -> Path:
    """Create ``path`` (mode 0700) if missing and check it is safe to keep events in.

    :raises UnsafePathError: the path is a symlink, not a directory, owned by another user,
        or writable by group/others.
    :raises StorageUnavailableError: it can't be created now (read-only or full disk, no
        permission).
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
        raise _os_error("cannot create queue directory", path, exc) from exc
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
        raise _os_error("cannot create directory", path, exc) from exc


def _check_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise _os_error("cannot stat", path, exc) from exc
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
    :raises StorageUnavailableError: the file is missing and can't be created now.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno == errno.EROFS and os.path.lexists(path):
            # O_CREAT on a read-only filesystem fails with EROFS even when the file exists;
            # an existing file is checked below like any other.
            pass
        else:
            raise _os_error("cannot create", path, exc) from exc
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
        try:
            os.chmod(path, 0o600, follow_symlinks=False)
        except OSError as exc:
            raise _os_error("cannot make private", path, exc) from exc


# --- the files of one queue ------------------------------------------------------------------


def writer_file_name(pid: int, token: str) -> str:
    """The name of writer ``pid``'s queue file (``token``: 16 random hex digits)."""
    return f"{WRITER_PREFIX}{pid}-{token}.db"


def _is_writer_file(name: str) -> bool:
    if not (name.startswith(WRITER_PREFIX) and name.endswith(".db")):
        return False
    pid, _, token = name[len(WRITER_PREFIX) : -3].partition("-")
    return pid.isdigit() and len(token) == 16 and all(c in "0123456789abcdef" for c in token)


def queue_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every queue file in ``directory``: 0.1's ``queue.db`` first, then the writers' files.

    Moved-aside files (``*.corrupt-*``, ``*.orphan-*``) and ``-wal``/``-shm`` are not queue
    files. The writers' files are ordered by name (pid, then token): a stable order, not an
    age. A missing directory has none.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    base = Path(directory)
    found = [base / name for name in sorted(names) if _is_writer_file(name)]
    if DB_NAME in names:
        found.insert(0, base / DB_NAME)
    return found


def lock_path_of(db: Path) -> Path:
    """The owner's lock file of writer file ``db`` (0.1's ``queue.db`` has none)."""
    return db.with_suffix(LOCK_SUFFIX)


def owner_pid(db: Path) -> int | None:
    """The process id in a writer file's name (None for ``queue.db``)."""
    if not _is_writer_file(db.name):
        return None
    return int(db.name[len(WRITER_PREFIX) :].partition("-")[0])


def wal_size(db: Path) -> int:
    """Bytes in the database's ``-wal`` file (0 when there is none)."""
    try:
        return os.stat(str(db) + "-wal").st_size
    except OSError:
        return 0


def file_size(db: Path) -> int:
    """Bytes on disk: the database plus its WAL (a missing file counts 0)."""
    total = wal_size(db)
    with contextlib.suppress(OSError):
        total += os.stat(db).st_size
    return total


def flush_lock(directory: Path) -> filelock.FileLock:
    """A lock object for ``directory``'s flush lock; the caller makes or checks the file first.

    The flusher's election and the CLI's "is anyone flushing?" probe must build it the same
    way. ``timeout=0``: both want "free right now?", one attempt, never a wait.
    ``thread_local=False``: one object per file is shared by the threads of a process, and a
    forked child must find the descriptor whichever thread took the lock (flusher.py).
    ``preserve_lock_file=True``: the path is never unlinked, so every process locks the same
    inode. ``fallback_to_soft=False``: on a filesystem without ``flock`` fail instead of
    silently using a marker file that a crashed holder would leave behind.
    """
    return filelock.FileLock(
        str(directory / FLUSH_LOCK_NAME),
        timeout=0,
        thread_local=False,
        preserve_lock_file=True,
        fallback_to_soft=False,
    )


# --- network filesystems ---------------------------------------------------------------------


def network_filesystem(path: str | os.PathLike[str], mounts: str | None = None) -> str | None:
    """The filesystem type holding ``path`` if it is a network one, else None.

    ``mounts`` is the text of ``/proc/mounts`` (read when None; a system without it detects
    nothing). The mount point that holds the path is the longest one that is a prefix of its
    real path, the last one listed winning when several are stacked on the same point.
    """
    if mounts is None:
        try:
            with open(_MOUNTS, encoding="utf-8", errors="replace") as f:
                mounts = f.read()
        except OSError:
            return None
    target = os.path.realpath(path)
    best_len = -1
    best_type = ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount_field(fields[1])
        if _contains(point, target) and len(point) >= best_len:
            best_len = len(point)
            best_type = fields[2]
    return best_type if best_type in NETWORK_FILESYSTEMS else None


def check_local_filesystem(path: Path) -> None:
    """Refuse a queue directory on a network filesystem (see the module docstring).

    :raises NetworkFilesystemError: naming the path and the filesystem type.
    """
    fstype = network_filesystem(path)
    if fstype is not None:
        raise NetworkFilesystemError(
            f"refusing queue directory {path}: it is on a network filesystem ({fstype}); "
            "SQLite's WAL mode corrupts databases shared that way. Set persistence_dir to a "
            "local disk",
            path=str(path),
            fstype=fstype,
        )


def _contains(mount_point: str, target: str) -> bool:
    if mount_point == "/":
        return target.startswith("/")
    return target == mount_point or target.startswith(mount_point.rstrip("/") + "/")


def _unescape_mount_field(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040 \011 \012 \134.
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i : i + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
