"""The files of the libraries' pretrained weights (``--pretrained``): found in the library's own
cache, downloaded there when absent and the network answers, and checked, before any data loads.

- torchvision: ``TORCH_HOME``'s hub cache, ``<hub>/checkpoints/NAME-HASH.pth``; HASH is the start
  of the file's sha256 (torch hub's convention, which its ``check_hash`` verifies on download),
  verified here on every use, so a stray file under that name is refused, not recorded as the
  published weights.
- timm: the Hugging Face cache (``HF_HOME``); its blobs are named by their sha256 (large files),
  which is checked. Without the file and without a hub to ask (``HF_HUB_OFFLINE``, or the hub's
  host or the proxy refusing a connection) the error comes at once, not after the hub client's
  retries.

Every failure is one :class:`~kdfine.errors.InputError` (exit 3) naming the file, the cache and
the fix.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from kdfine.errors import InputError
from kdfine.files.rows import file_sha256

#: torch hub's file names: ``NAME-<sha256 prefix>.EXT``.
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_SHA256 = re.compile(r"[0-9a-f]{64}")
PROBE_SECONDS = 5.0  # how long the hub (or the proxy) may take to accept a connection
_verified: set[tuple[str, int, int]] = set()  # (real path, size, mtime): each file is hashed once per process


def hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix in a torch hub file name (``resnet18-f37072fd.pth`` -> ``f37072fd``)."""
    m = HASH_IN_NAME.search(file_name)
    return m.group(1) if m else None


def sha256_matches(path: Path, expected: str) -> tuple[bool, str]:
    """(whether the sha256 of ``path`` starts with ``expected``, the digest). A file already
    verified in this process (same size and mtime) is not hashed again."""
    st = path.stat()
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if (key, expected) in _verified:
        return True, ""
    digest = file_sha256(path)
    ok = digest.startswith(expected)
    if ok:
        _verified.add((key, expected))
    return ok, digest


def tv_file(name: str, url: str, hub_dir: Path) -> Path:
    """torchvision's weights file of ``tv:name`` (published at ``url``) in ``hub_dir/checkpoints``,
    downloaded when absent; verified against the hash in its name."""
    import torch

    folder = hub_dir / "checkpoints"
    path = folder / Path(urlparse(url).path).name
    prefix = hash_prefix(path.name)
    what = f"--pretrained tv:{name}"
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
        except Exception as e:  # offline, proxy, disk, a corrupted download: all mean the same to the user
            path.unlink(missing_ok=True)
            raise InputError(f"{what}: weights file {path.name} is not in {folder} and could not be downloaded "
                             f"({type(e).__name__}); copy {url} there") from None
    if prefix is not None:
        ok, digest = sha256_matches(path, prefix)
        if not ok:
            raise InputError(f"{what}: {path} is not the published weights file (its sha256 begins "
                             f"{digest[:len(prefix)]}, the published file's {prefix}); delete it and run again "
                             f"online, or copy {url} there")
    return path


def hub_unreachable(endpoint: str) -> str | None:
    """Why the Hugging Face hub at ``endpoint`` cannot answer now (``HF_HUB_OFFLINE``, or no TCP
    connection to it, or to the proxy that the environment names for it, within
    :data:`PROBE_SECONDS`), or None when it may."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    target = urlparse(proxy) if proxy and not urllib.request.proxy_bypass(url.hostname or "") else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        via = " (the proxy)" if target is not url else ""
        return f"{target.hostname}:{port}{via} cannot be reached: {e.strerror or str(e) or type(e).__name__}"
    return None


def _check_blob(path: str, what: str) -> None:
    """A Hugging Face cache file whose blob is named by its sha256 must hash to that name."""
    real = Path(os.path.realpath(path))
    if _SHA256.fullmatch(real.name) and not sha256_matches(real, real.name)[0]:
        raise InputError(f"{what}: the cached file {path} does not match the sha256 the cache names it by "
                         f"(a damaged or replaced file); delete {real} to download it again")


def timm_file(name: str, hf_hub_id: str, filename: str | None) -> str:
    """timm's weights file of ``timm:name`` from the Hugging Face repo ``hf_hub_id`` (``repo@rev``):
    ``filename``, or ``model.safetensors`` then ``pytorch_model.bin`` (timm's order); from the
    cache, else downloaded. Returns its local path."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hf_hub_id.partition("@")
    names = (filename,) if filename else ("model.safetensors", "pytorch_model.bin")
    what = f"--pretrained timm:{name}"
    for fn in names:
        cached = try_to_load_from_cache(repo, fn, revision=revision or None)
        if isinstance(cached, str):
            _check_blob(cached, what)
            return cached
    where = (f"weights from Hugging Face repo {repo} ({names[0]}) are not in the cache {constants.HF_HUB_CACHE} "
             "and could not be downloaded")
    why = hub_unreachable(constants.ENDPOINT)
    if why:
        raise InputError(f"{what}: {where} ({why}); run once online or set HF_HOME to a cache that has them")
    for fn in names:
        try:
            path = hf_hub_download(repo, fn, revision=revision or None)
        except EntryNotFoundError:
            continue
        except Exception as e:
            raise InputError(f"{what}: {where} ({type(e).__name__}); run once online or set HF_HOME to a cache "
                             "that has them") from None
        _check_blob(path, what)
        return path
    raise InputError(f"{what}: Hugging Face repo {repo} has none of {', '.join(names)}")
