"""Input files that kdfine opens whole (checkpoints, ``--init`` weights): regular files only.

Opening a FIFO blocks until someone writes to it, a character device (``/dev/zero``) never ends,
and a directory is no file: each is refused here, with what it is, before it is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kdfine.errors import InputError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | os.PathLike, what: str, expected: str = "a file") -> Path:
    """``path`` as a Path when it is a regular file (symbolic links followed); else InputError
    (exit 3) naming ``what`` (the option, e.g. ``--init``) and what the path is instead."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {p}: no such file") from None
    except OSError as e:
        raise InputError(f"{what} {p}: cannot access it ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return p
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {p}: is a directory; give {expected}")
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    raise InputError(f"{what} {p}: is {kind}, not a regular file; give {expected} (copy a stream to a file first)")
