"""All-or-nothing outputs: the files one command writes, checked before work starts and committed together.

A command declares every output up front (:meth:`Outputs.add`): each is checked (a writable
directory, a name that the file system and the files written beside it can hold, valid UTF-8),
and none may be one of the command's inputs or another output (same resolved path or same inode:
exit 2). Writers write to temporaries beside their targets (:meth:`Outputs.open`,
:meth:`Outputs.stage`); :meth:`Outputs.commit` renames them all into place at the end. A command
that fails before the commit leaves every target as it was and no temporary behind.

:func:`run_lock` is the lock beside a training run's ``--out``: a second run on the same output is
refused while the first lives; the lock of a dead process is taken over (``flock`` dies with it).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from kdfine.errors import InputError, UsageError
from kdfine.io import check_writable, is_special

# Bytes that kdfine adds to a target's name for the files it writes beside it: a staged temporary
# ".kdfine-XXXXXXXX-NAME" and, inside it, an atomic write's ".NAME.XXXXXXXX.tmp".
NAME_SLACK = 32


def check_name(path: str | os.PathLike, option: str, companions: Iterable[str] = ()) -> None:
    """Exit 2 unless ``path`` (and ``path + suffix`` for each of ``companions``, such as the resume
    state) is valid UTF-8 and short enough for the temporaries written beside it."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{option} {text.encode('utf-8', 'replace').decode()}: the file name is not valid "
                         "UTF-8 (other commands could not read it back); choose another name") from None
    p = Path(text)
    parent = p.parent if p.parent.is_dir() else Path(".")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max([len(os.fsencode(p.name))] + [len(os.fsencode(p.name + s)) for s in companions])
    if longest + NAME_SLACK > limit:
        raise UsageError(f"{option} {text[:60]}...: the file name is too long ({len(os.fsencode(p.name))} bytes; "
                         f"kdfine writes files beside it with names up to {longest - len(os.fsencode(p.name)) + NAME_SLACK}"
                         f" bytes longer, and this file system allows {limit}); choose a shorter name")


def _identity(p: Path) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (device, inode) when the file exists): two names for one file compare equal."""
    try:
        st = p.stat()
        ino = (st.st_dev, st.st_ino)
    except OSError:
        ino = None
    return str(p.resolve()), ino


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


@dataclass
class _Target:
    path: Path
    option: str
    directory: bool = False
    temp: Path | None = None  # the staged file or folder, once written
    buffer: io.BytesIO | None = None  # stdout ("-") and special files: written at commit
    remove: bool = False  # commit deletes the target (a sidecar the new set does not have)


class Outputs:
    """The outputs of one command (see the module docstring). Use as a context manager: leaving it
    by an exception removes every temporary; :meth:`commit` must be called for anything to land."""

    def __init__(self) -> None:
        self._targets: list[_Target] = []
        self._inputs: list[tuple[str, str, tuple]] = []  # (option, path as given, identity)

    # ------------------------------------------------------------------ declaring

    def input(self, path: str | os.PathLike | None, option: str) -> None:
        """Declare a file the command reads; no output may be it."""
        if path is None or os.fspath(path) in ("", "-"):
            return
        ident = _identity(Path(path))
        for t in self._targets:
            self._refuse_input(t, option, path, ident)
        self._inputs.append((option, os.fspath(path), ident))

    def add(self, path: str | os.PathLike | None, option: str, *, directory: bool = False,
            companions: Iterable[str] = (), remove: bool = False) -> Path | None:
        """Declare an output and check it now (``-`` is stdout). ``companions``: suffixes of files a
        run writes beside it (their names are checked too); ``remove``: delete it at commit."""
        if path is None:
            return None
        text = os.fspath(path)
        for t in self._targets:
            if os.fspath(t.path) == os.fspath(Path(text)) and t.option == option and t.remove == remove:
                return t.path  # declared again (a command and the one it calls): already checked
        target = _Target(Path(text), option, directory, remove=remove)
        if text == "-":
            self._targets.append(target)
            return target.path
        check_name(text, option, companions)
        if directory:
            self._check_dir(target.path, option)
        elif not remove:
            check_writable(target.path, option)
        ident = _identity(target.path)
        if not is_special(target.path):
            for other in self._targets:
                if str(other.path) != "-" and not other.remove and not remove and _same(_identity(other.path), ident):
                    raise UsageError(f"{option} {text} and {other.option} {other.path} are the same file; "
                                     "give each output its own name")
            for opt, given, in_ident in self._inputs:
                self._refuse_input(target, opt, given, in_ident)
        self._targets.append(target)
        return target.path

    @staticmethod
    def _refuse_input(t: _Target, option: str, given: str, ident: tuple) -> None:
        if str(t.path) != "-" and not t.remove and not is_special(t.path) and _same(_identity(t.path), ident):
            raise UsageError(f"{t.option} {t.path} is the input {option} {given}; writing it would destroy "
                             "the input: choose another output name")

    @staticmethod
    def _check_dir(p: Path, option: str) -> None:
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise InputError(f"{option} {p}: exists and is not empty (or not a directory); choose a new directory")
        if not p.exists():
            check_writable(p, option)  # its parent exists and takes new files
        else:
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".kdfine-probe-", dir=p.parent if str(p.parent) else "."))
            except OSError as e:
                raise InputError(f"{option} {p}: cannot create files beside it ({e.strerror or e})") from None

    def _target(self, path: str | os.PathLike) -> _Target:
        text = os.fspath(Path(path))
        for t in self._targets:
            if os.fspath(t.path) == text and not t.remove:
                return t
        raise ValueError(f"{text} was not declared as an output")  # a bug in kdfine, not the user's

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
        """A file to write the declared output ``path`` into; errors name ``path``, never the temporary."""
        t = self._target(path)
        if str(t.path) == "-" or is_special(t.path):
            t.buffer = io.BytesIO()
            if "b" in mode:
                yield t.buffer
            else:
                text = io.TextIOWrapper(t.buffer, encoding="utf-8", newline="")
                yield text
                text.flush()
                text.detach()
            return
        tmp = self._new_temp(t)
        try:
            text_kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
            with open(tmp, mode, **text_kw) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None

    def stage(self, path: str | os.PathLike, write: Callable[[Path], object]) -> object:
        """Call ``write(temporary path)`` for the declared output ``path`` (a file, or a folder for a
        directory output; the temporary keeps the target's suffix, which picks a plot's format);
        its errors are reported against ``path``. Returns what ``write`` returns."""
        t = self._target(path)
        tmp = self._new_temp(t)
        if t.directory:
            tmp.mkdir()
        try:
            return write(tmp)
        except InputError as e:
            raise InputError(str(e).replace(str(tmp), str(t.path))) from None
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None

    def claim(self, path: str | os.PathLike, temp: Path) -> None:
        """Adopt ``temp`` (written, or about to be written, by the caller) as the staged file of the
        declared output ``path``: committed over it, or removed when the command fails."""
        t = self._target(path)
        if t.temp is not None:
            _remove(t.temp)
        t.temp = temp

    def _new_temp(self, t: _Target) -> Path:
        if t.temp is not None:
            _remove(t.temp)
        if is_special(t.path):  # /dev/null and friends: staged in $TMPDIR, copied in at commit
            t.temp = Path(tempfile.mkdtemp(prefix="kdfine-")) / t.path.name
        else:
            parent = t.path.parent if str(t.path.parent) else Path(".")
            t.temp = parent / f".kdfine-{os.urandom(4).hex()}-{t.path.name}"
        return t.temp

    # ------------------------------------------------------------------ committing

    def commit(self) -> None:
        """Put every written output in place: stdout and special files first (they cannot be
        rolled back, and a full /dev/full or a closed pipe then stops the rest), then the renames."""
        for t in self._targets:
            if t.buffer is not None:
                self._write_now(t, t.buffer.getvalue())
            elif t.temp is not None and is_special(t.path):
                self._write_now(t, t.temp.read_bytes())
        try:
            for t in self._targets:
                if t.remove:
                    t.path.unlink(missing_ok=True)
                elif t.temp is not None and not is_special(t.path):
                    if t.directory and t.path.is_dir():
                        t.path.rmdir()  # empty: checked when declared
                    os.replace(t.temp, t.path)
                    t.temp = None
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None
        finally:
            self.discard()

    @staticmethod
    def _write_now(t: _Target, data: bytes) -> None:
        if str(t.path) == "-":
            sys.stdout.flush()
            out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
            if out is None:
                sys.stdout.write(data.decode("utf-8"))
            else:
                out.write(data)
            sys.stdout.flush()  # a closed pipe raises BrokenPipeError: the CLI exits 141
            return
        try:
            with open(t.path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None

    def discard(self) -> None:
        """Remove every temporary (the targets stay as they were)."""
        for t in self._targets:
            if t.temp is not None:
                _remove(t.temp)
                if is_special(t.path):
                    _remove(t.temp.parent)
                t.temp = None
            t.buffer = None

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def lock_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.lock")


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, option: str = "--out") -> Iterator[Path | None]:
    """Hold ``OUT.lock`` (an ``flock`` and the holder's pid) while a run writes ``out`` and its
    resume state. Another live holder: exit 2 naming its pid. A lock file left by a dead process
    is free (the kernel dropped its lock) and is taken over. Nothing is locked for special files."""
    import fcntl

    if is_special(out):
        yield None
        return
    lock = lock_path(out)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{option} {out}: cannot create the lock file {lock} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{option} {out}: another kdfine run is writing it (pid {holder}, lock {lock}); "
                             "wait for it to finish or choose another --out") from None
        try:  # the file we locked must still be the one at `lock` (a finishing run unlinks it)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
