"""The decode cache: .npy entries that numpy reads, atomic builds, an unwritable cache, draft()."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from conftest import cli_env
from kdfine.data import cache
from kdfine.data.decode import DecodeSpec, decode_image
from kdfine.data.sources import load_source


def _noise_tree(root: Path, n: int, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png", compress_level=1)
    return root


def test_sink_writes_a_standard_npy_read_back_as_a_memory_map(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (23, 4, 5, 3), dtype=np.uint8)
    sink = cache.ArraySink((4, 5, 3), 23, tmp_path / "a.npy")
    for lo in range(0, 23, 10):
        sink.append(x[lo:lo + 10])
    mapped = sink.finish()
    assert isinstance(mapped.base, mmap.mmap) and np.array_equal(mapped, x)
    assert np.array_equal(np.load(tmp_path / "a.npy"), x)  # plain numpy reads the rewritten header
    memory = cache.ArraySink((4, 5, 3), 23)
    memory.append(x[:5])
    assert np.array_equal(memory.finish(), x[:5])


def test_key_follows_names_sizes_mtimes_and_parameters(tmp_path):
    from kdfine.data.identity import stat_tree

    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 10)
    key = lambda names, params: cache.tree_key(stat_tree(tmp_path, [str(f)]), names, params)
    k = key(["a"], {"image_size": 32})
    assert k == key(["a"], {"image_size": 32})
    assert k != key(["a"], {"image_size": 64}) and k != key(["b"], {"image_size": 32})
    os.utime(f, ns=(0, 10**9))
    assert k != key(["a"], {"image_size": 32})


def test_a_decode_killed_mid_write_leaves_nothing_trusted(tmp_path, monkeypatch):
    root = _noise_tree(tmp_path / "t", 400, 80)
    store = tmp_path / "store"
    code = ("import sys; from kdfine.data import cache; cache.decode_workers = lambda: 1; "
            "from kdfine.data.sources import load_source; load_source('imagefolder:' + sys.argv[1], image_size=24)")
    child = subprocess.Popen([sys.executable, "-c", code, str(root)], env=cli_env({"KDFINE_CACHE": str(store)}))
    deadline = time.monotonic() + 120
    partial = []
    while time.monotonic() < deadline and child.poll() is None and not partial:
        partial = [p for p in store.glob("decoded/.*.tmp-*/train.npy") if p.stat().st_size > cache.HEADER_BYTES]
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the decode finished before it could be killed"
    assert partial and not list(store.glob("decoded/*/manifest.json"))
    monkeypatch.setenv("KDFINE_CACHE", str(store))
    src = load_source(f"imagefolder:{root}", image_size=24)
    assert not list(store.glob("decoded/.*.tmp-*")), "the killed build's directory was not removed"
    assert len(src.train) + len(src.test) == 400 and isinstance(src.train.images.base, mmap.mmap)
    f = Path(src.train.files[-1])
    assert np.array_equal(src.train.images[-1], decode_image(f, DecodeSpec(24, 3))[0])


def test_an_unwritable_cache_costs_only_time(tmp_path, monkeypatch):
    from conftest import write_png_tree

    root = write_png_tree(tmp_path / "t", per_class=3, size=8)
    cached = load_source(f"imagefolder:{root}")
    blocker = tmp_path / "a-file"
    blocker.write_text("KDFINE_CACHE points here, at a file")
    monkeypatch.setenv("KDFINE_CACHE", str(blocker))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        src = load_source(f"imagefolder:{root}")
    said = [str(w.message) for w in rec]
    assert len(said) == 1 and "cannot write" in said[0], said
    assert src.info["cache"] is None and np.array_equal(src.train.images, cached.train.images)
    assert src.train.mean == cached.train.mean and blocker.read_text().startswith("KDFINE_CACHE")


def test_draft_decodes_large_jpegs_close_to_a_full_decode(tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[0:240, 0:320]
    smooth = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) * 255 // 558], -1).astype(np.uint8)
    f = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(f, quality=95)
    fast, colour, size = decode_image(f, DecodeSpec(32, 3, draft=True))
    full = decode_image(f, DecodeSpec(32, 3, draft=False))[0]
    assert colour and size == (320, 240)
    assert fast.shape == full.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3
    # the centre crop of a 4:3 image: the red ramp covers the middle 3/4 of the width only
    assert 20 < full[:, 0, 0].mean() < 50 and 205 < full[:, -1, 0].mean() < 235


def test_manifest_records_the_decode(tmp_path):
    from conftest import write_png_tree

    src = load_source(f"imagefolder:{write_png_tree(tmp_path / 't', per_class=2, size=8)}")
    m = json.loads((Path(src.info["cache"]) / "manifest.json").read_text())
    assert m["image_size"] == 8 and m["channels"] == 3 and m["resize"] == "crop"
    assert m["splits"]["train"]["files"] == 6 and m["splits"]["train"]["skipped"] == []
    assert m["arrays"] == ["test", "test_kept", "test_labels", "train", "train_kept", "train_labels"]
    assert m["content"].startswith("content-sha256:")
