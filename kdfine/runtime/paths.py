"""Where kdfine keeps what it caches for this machine: ``$KDFINE_CACHE``, else ``~/.cache/kdfine``,
else (no home directory) a private directory in the temporary directory.

In the lowest layer, so that the decode cache (:mod:`kdfine.data.cache`) and the CPU precision
probe (:mod:`kdfine.runtime.precision`) share one rule.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from pathlib import Path

from kdfine.errors import KdfineWarning, UsageError


def cache_dir() -> Path:
    """``$KDFINE_CACHE``, else ``~/.cache/kdfine``; without any home directory (``HOME`` unset and
    a user the password database does not know, as in some containers) a private directory
    ``kdfine-cache-UID`` of this user in the temporary directory, with one warning. Exit 2 when
    that name is taken by something that is not such a directory."""
    env = os.environ.get("KDFINE_CACHE")
    if env:
        return Path(env)
    home = os.path.expanduser("~")
    if home and home != "~":
        return Path(home) / ".cache" / "kdfine"
    return _private_temp_cache()


def _private_temp_cache() -> Path:
    d = Path(tempfile.gettempdir()) / f"kdfine-cache-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UsageError(f"no home directory for the decode cache (HOME is not set and user {os.geteuid()} has none), "
                         f"and {d} is not a private directory of this user; set KDFINE_CACHE to a writable directory")
    if d not in _ANNOUNCED:  # once per process, wherever the cache is asked for
        _ANNOUNCED.add(d)
        warnings.warn(f"no home directory (HOME is not set and user {os.geteuid()} has none): the decode cache is "
                      f"in {d}; set KDFINE_CACHE to keep it elsewhere", KdfineWarning, stacklevel=3)
    return d


_ANNOUNCED: set[Path] = set()
