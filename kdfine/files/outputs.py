"""All-or-nothing outputs: the files one command writes, checked before work starts and committed together.

A command declares every output up front (:meth:`Outputs.add`): each is checked (a writable
directory, a name that the file system and the files written beside it can hold, valid UTF-8),
and none may be one of the command's inputs or another output (same resolved path or same inode:
exit 2). Writers write to temporaries beside their targets (:meth:`Outputs.open`,
:meth:`Outputs.stage`); :meth:`Outputs.commit` renames them all into place at the end. A command
that fails before the commit leaves every target as it was and no temporary behind. Two kinds of
file must land before the end, and go through the same declared targets: a training run's resume
state after every epoch (:meth:`Outputs.write_now`, atomic) and its per-epoch log
(:meth:`Outputs.live`, written in place as it grows).

This is the only way kdfine writes a file (the decode cache, a directory of its own, aside).

Output directories may be shared with other people, so nothing there is followed or trusted as
found: a temporary is created exclusively (``O_EXCL | O_NOFOLLOW``, never an existing file or a
link), a target is replaced by a rename (a link at the target is replaced, not followed), and a
symbolic link owned by another user never counts as a special file to be written through.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from kdfine.errors import InputError, UsageError

# Bytes that kdfine adds to a target's name for the files it writes beside it: a staged temporary
# ".kdfine-XXXXXXXX-NAME" and, inside it, an atomic write's ".NAME.XXXXXXXX.tmp".
NAME_SLACK = 32


def check_writable(path: str | os.PathLike, option: str = "--out") -> Path:
    """Fail early (before any long work) if ``path`` cannot be written.

    Checks that the parent directory exists and that a file can really be created in it (a probe
    file, removed at once: permission bits say nothing for root, and nothing about read-only
    mounts), so a two-hour training run does not end with "no such directory".
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{option} {p}: is a directory; give a file name")
    if is_special(p):
        return p  # a device or pipe such as /dev/null or /dev/stdout: written in place
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist; create it first"
        raise InputError(f"{option} {p}: {parent} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise InputError(f"{option} {p}: cannot create files in {parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def is_special(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a directory (``/dev/null``, a FIFO):
    such targets are written in place, and nothing is written beside them. A symbolic link is
    followed only when this user or root made it (``/dev/stdout``): another user's link to a
    device is a name to be replaced, never a way to make kdfine write where that user chose."""
    p = Path(path)
    if not (p.exists() and not p.is_dir() and not _is_regular(p)):
        return False
    try:
        owner = os.lstat(p).st_uid
    except OSError:
        return False
    return not p.is_symlink() or owner in (0, os.geteuid())


def is_stdout(path: str | os.PathLike) -> bool:
    """Whether ``path`` is ``-`` or names the file this process's stdout writes to
    (``/dev/stdout``, ``/proc/self/fd/1``, or the very file stdout was redirected to)."""
    if os.fspath(path) == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such file, or stdout is no real file
        return False


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


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
        if p.is_symlink():  # the commit replaces the directory by a rename: a link cannot be honoured
            raise InputError(f"{option} {p}: is a symbolic link; give the name of a new (or empty) directory")
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
            with open(tmp, mode, opener=_own_file, **text_kw) as f:
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
        try:
            return write(tmp)
        except InputError as e:
            raise InputError(str(e).replace(str(tmp), str(t.path))) from None
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None

    def write_now(self, path: str | os.PathLike, data: bytes) -> None:
        """Replace the declared output ``path`` with ``data`` at once, atomically (a temporary
        beside it, renamed over it): a training run's resume state after each epoch."""
        t = self._target(path)
        with self.open(path, "wb") as f:
            f.write(data)
        if t.buffer is not None:  # a special file: written in place
            self._write_now(t, t.buffer.getvalue())
            t.buffer = None
            return
        try:
            os.replace(t.temp, t.path)
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None
        t.temp = None

    def live(self, path: str | os.PathLike) -> IO[str]:
        """The declared output ``path`` as a new, empty file open for writing (text): a file that
        grows while the command runs and is read meanwhile (the per-epoch ``--log``). It is
        created beside the target and renamed over it at once, so whatever was there (a link
        included) is replaced, never written through or truncated; special files are written in place."""
        t = self._target(path)
        try:
            if is_special(t.path):
                return open(t.path, "w", encoding="utf-8")
            tmp = self._new_temp(t)
            f = open(tmp, "w", encoding="utf-8", opener=_own_file)
            os.replace(tmp, t.path)
            t.temp = None
            return f
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None

    def claim(self, path: str | os.PathLike, temp: Path) -> None:
        """Adopt ``temp`` (about to be written by the caller) as the staged file of the declared
        output ``path``: created here, exclusively (a file or link already at that name is
        refused), then committed over ``path``, or removed when the command fails."""
        t = self._target(path)
        if t.temp is not None:
            _remove(t.temp)
            t.temp = None
        try:
            t.temp = _create(Path(temp), t.directory)
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e} ({temp})") from None

    def _new_temp(self, t: _Target) -> Path:
        """A new, empty file (or directory, for a directory output) that this process created
        under a fresh name beside the target: never an existing file or a link."""
        if t.temp is not None:
            _remove(t.temp)
            t.temp = None
        try:
            if is_special(t.path):  # /dev/null and friends: staged in $TMPDIR, copied in at commit
                t.temp = _create(Path(tempfile.mkdtemp(prefix="kdfine-")) / t.path.name, t.directory)
                return t.temp
            parent = t.path.parent if str(t.path.parent) else Path(".")
            for _ in range(100):
                with contextlib.suppress(FileExistsError):
                    t.temp = _create(parent / f".kdfine-{os.urandom(4).hex()}-{t.path.name}", t.directory)
                    return t.temp
        except OSError as e:
            raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None
        raise InputError(f"cannot write {t.path}: no free temporary name beside it")

    # ------------------------------------------------------------------ committing

    def commit(self) -> None:
        """Put every written output in place: stdout and special files first (they cannot be
        rolled back, and a full /dev/full or a closed pipe then stops the rest), then, once every
        target has been checked to take its rename, the renames."""
        self._check_renames()
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

    def _check_renames(self) -> None:
        """Refuse (exit 3, nothing renamed yet) a target that changed since it was declared so that
        its rename would fail half-way through the set: a file output that is now a directory, a
        directory output that is now a link, a file or a non-empty directory."""
        for t in self._targets:
            if t.temp is None or t.remove or str(t.path) == "-" or is_special(t.path):
                continue
            try:
                st = os.lstat(t.path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise InputError(f"cannot write {t.path}: {e.strerror or e}") from None
            if t.directory and (not stat.S_ISDIR(st.st_mode) or any(t.path.iterdir())):
                raise InputError(f"{t.option} {t.path}: changed while the command ran (it is now a link, a file or "
                                 "a non-empty directory); nothing was written: give a new directory")
            if not t.directory and stat.S_ISDIR(st.st_mode):
                raise InputError(f"{t.option} {t.path}: is now a directory; nothing was written: give a file name")

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


def _own_file(path: str, flags: int) -> int:
    """``open()``'s opener for a temporary this process created: never through a link."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def _create(p: Path, directory: bool) -> Path:
    """Create ``p`` exclusively (FileExistsError when anything, a link included, is there)."""
    if directory:
        p.mkdir()
    else:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
    return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
