"""The lock beside a training run's ``--out``: a second run on the same output is refused while the
first lives; the lock of a dead process is taken over (``flock`` dies with it).

The lock file lives in the output's directory, which other people may be able to write (a shared
scratch or project folder), so it is never trusted as found: kdfine creates it itself
(``O_CREAT | O_EXCL | O_NOFOLLOW``) and only ever writes into a file it has just created. A lock
file left by a dead run is removed and created anew, never truncated, and only when it is a plain
regular file of this user with one name (not a link of any kind) that holds a lock line.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
from pathlib import Path
from typing import Iterator

from kdfine.errors import InputError, UsageError
from kdfine.files.outputs import is_special

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_LOCK_LINE = re.compile(rb"\d{1,10} on [^\n]{0,255}\n?")  # what run_lock writes: "PID on HOST\n"


def lock_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.lock")


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, option: str = "--out") -> Iterator[Path | None]:
    """Hold ``OUT.lock`` (an ``flock`` and the holder's pid) while a run writes ``out`` and its
    resume state. Another live holder: exit 2 naming its pid. A lock file left by a dead process
    is free (the kernel dropped its lock) and is replaced. A link or a file that is not a kdfine
    lock of this user at that name: exit 3, nothing written. Nothing is locked for special files."""
    if is_special(out):
        yield None
        return
    lock = lock_path(out)
    fd = _acquire(lock, out, option)
    try:
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
    except OSError as e:
        _release(lock, fd)
        raise InputError(f"{option} {out}: cannot write the lock file {lock} ({e.strerror or e})") from None
    try:
        yield lock
    finally:
        _release(lock, fd)


def _acquire(lock: Path, out: str | os.PathLike, option: str) -> int:
    """A descriptor of a lock file this process created and holds the ``flock`` of."""
    import fcntl

    for _ in range(100):  # each round either wins, fails, or removes a dead run's file
        fd, created = _open(lock, out, option)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{option} {out}: another kdfine run is writing it (pid {holder[:80]}, lock {lock}); "
                             "wait for it to finish or choose another --out") from None
        if not _still_named(lock, fd):  # a finishing run or a taker-over unlinked it meanwhile
            os.close(fd)
            continue
        if created:
            return fd
        _check_stale(lock, fd, out, option)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # the dead run's file; ours is created next round, under our flock's eyes
        os.close(fd)
    raise UsageError(f"{option} {out}: the lock file {lock} keeps changing; another process is using it")


def _open(lock: Path, out: str | os.PathLike, option: str) -> tuple[int, bool]:
    """(descriptor, created): a new lock file, or the existing one after checking that it is a
    regular file of this user with one name (never a symbolic link: it is not followed)."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644), True
    except FileExistsError:
        pass
    except OSError as e:
        raise InputError(f"{option} {out}: cannot create the lock file {lock} ({e.strerror or e})") from None
    try:
        before = os.lstat(lock)
        if not stat.S_ISREG(before.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(before.st_mode) else "not a regular file"
            raise _foreign(lock, out, option, f"is {kind}")
        fd = os.open(lock, os.O_RDWR | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:  # removed since: try creating it again
        return _open(lock, out, option)
    except OSError as e:
        raise _foreign(lock, out, option, f"cannot be opened ({e.strerror or e})") from None
    st = os.fstat(fd)
    why = ("is not the file that was checked" if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) else
           "is not a regular file" if not stat.S_ISREG(st.st_mode) else
           "belongs to another user" if st.st_uid != os.geteuid() else
           "has other names (hard links)" if st.st_nlink != 1 else None)
    if why:
        os.close(fd)
        raise _foreign(lock, out, option, why)
    return fd, False


def _check_stale(lock: Path, fd: int, out: str | os.PathLike, option: str) -> None:
    """A lock file found (not created) and free must hold a lock line (or nothing: a run killed
    between creating and writing it) before it is removed."""
    head = os.pread(fd, 300, 0)
    if head and not _LOCK_LINE.fullmatch(head):
        os.close(fd)
        raise _foreign(lock, out, option, "does not hold a kdfine lock line")


def _foreign(lock: Path, out: str | os.PathLike, option: str, why: str) -> InputError:
    return InputError(f"{option} {out}: {lock} {why}; kdfine writes its lock there and never follows or "
                      "overwrites such a file: remove it (check who made it) or choose another --out")


def _still_named(lock: Path, fd: int) -> bool:
    """Whether ``lock`` still names the file open at ``fd`` (not followed if it is a link)."""
    try:
        a, b = os.lstat(lock), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(lock: Path, fd: int) -> None:
    """Remove the lock file (only if the name is still ours) and drop the lock."""
    if _still_named(lock, fd):
        with contextlib.suppress(OSError):
            os.unlink(lock)
    os.close(fd)
