"""Data sources: digits, image folders (with the decode cache), npz, torchvision errors."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_png_tree
from kdfine.data.sources import channel_stats, load_source
from kdfine.errors import InputError, UsageError


def test_digits_is_a_stratified_80_20_split():
    src = load_source("digits")
    tr, te = src.train, src.test
    assert len(tr) + len(te) == 1797 and tr.images.shape[1:] == (8, 8, 1)
    assert tr.images.dtype == np.uint8 and tr.labels.dtype == np.int64
    assert tr.images.max() == 255 and tr.classes == [str(i) for i in range(10)]
    # every class keeps its share within one sample
    full = np.bincount(np.r_[tr.labels, te.labels])
    assert np.array_equal(np.bincount(te.labels), np.round(0.2 * full).astype(int))
    assert tr.augment == "none"
    again = load_source("digits")
    assert np.array_equal(again.test.images, te.images)


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(x)
    f = x.reshape(-1, 3) / 255.0
    assert np.allclose(mean, f.mean(0), atol=1e-6) and np.allclose(std, f.std(0), atol=1e-6)


def test_imagefolder_train_test_tree(tmp_path):
    root = write_png_tree(tmp_path / "tree", per_class=6, size=12)
    src = load_source(f"imagefolder:{root}")
    assert src.train.images.shape == (18, 12, 12, 3) and src.test.images.shape == (6, 12, 12, 3)
    assert src.train.classes == ["cat", "dog", "fox"]
    assert np.bincount(src.train.labels).tolist() == [6, 6, 6]
    assert src.train.files is not None and src.train.files[0].endswith("cat/train/000.png".replace("cat/train", "train/cat"))
    # class colours survive decoding: cats are red-dominant
    assert src.train.images[src.train.labels == 0][..., 0].mean() > 150


def test_imagefolder_cache_is_used_and_invalidated(tmp_path):
    root = write_png_tree(tmp_path / "tree", per_class=4, size=8)
    first = load_source(f"imagefolder:{root}")
    entry = Path(first.info["cache"])
    assert entry.parent.parent == Path(os.environ["KDFINE_CACHE"]) and (entry / "manifest.json").is_file()
    assert isinstance(first.train.images.base, mmap.mmap)  # read back as a memory map, not loaded
    # Overwrite one image with different pixels of the same byte size and mtime: the cache key
    # (names, sizes, mtimes) is unchanged, so the cached pixels must come back.
    f = root / "train" / "cat" / "000.png"
    st = f.stat()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    data = f.read_bytes()
    f.write_bytes(data[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_source(f"imagefolder:{root}")
    assert np.array_equal(second.train.images, first.train.images)
    # a new file changes the key: the tree is decoded again
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(root / "train" / "cat" / "999.png")
    third = load_source(f"imagefolder:{root}")
    assert len(third.train) == len(first.train) + 1


def test_imagefolder_single_tree_uses_test_fraction(tmp_path):
    root = write_png_tree(tmp_path / "flat", per_class=10, size=8, test=False)
    src = load_source(f"imagefolder:{root}", test_fraction=0.3)
    assert len(src.train) == 21 and len(src.test) == 9


def test_imagefolder_sizes_must_agree_unless_resized(tmp_path):
    from PIL import Image

    root = write_png_tree(tmp_path / "mixed", per_class=3, size=8, test=False)
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / "dog" / "big.png")
    with pytest.raises(InputError, match="--image-size"):
        load_source(f"imagefolder:{root}")
    src = load_source(f"imagefolder:{root}", image_size=6)
    assert src.train.images.shape[1:] == (6, 6, 3)


def test_imagefolder_grayscale_and_errors(tmp_path):
    root = write_png_tree(tmp_path / "gray", per_class=3, size=8, mode="L")
    src = load_source(f"imagefolder:{root}")
    assert src.train.in_channels == 1
    with pytest.raises(InputError, match="no such directory"):
        load_source(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        load_source(f"imagefolder:{tmp_path / 'empty'}")


def test_cifar_jpeg_slice_decodes(cifar_slice):
    t0 = time.perf_counter()
    src = load_source(f"imagefolder:{cifar_slice}")
    assert src.train.images.shape == (200, 32, 32, 3) and len(src.test) == 50
    assert src.train.classes[:3] == ["airplane", "automobile", "bird"]
    assert src.train.augment == "crop-flip"
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = load_source(f"imagefolder:{cifar_slice}")
    assert np.array_equal(again.train.images, src.train.images)
    assert time.perf_counter() - t0 < max(cold, 1.0)


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x=rng.integers(0, 256, (40, 6, 6), dtype=np.uint8), y=np.arange(40) % 4,
             classes=np.array(["a", "b", "c", "d"]))
    src = load_source(f"npz:{p}")
    assert src.train.images.shape[1:] == (6, 6, 1) and len(src.train) + len(src.test) == 40
    assert src.train.classes == ["a", "b", "c", "d"]
    np.savez(p, x=rng.random((10, 4, 4, 3)), y=np.zeros(10, np.int64), x_test=rng.random((5, 4, 4, 3)),
             y_test=np.zeros(5, np.int64))
    src = load_source(f"npz:{p}")
    assert src.train.images.dtype == np.uint8 and len(src.test) == 5
    np.savez(p, x=np.zeros((3, 4, 4)), z=np.zeros(3))
    with pytest.raises(InputError, match="needs arrays 'x' and 'y'"):
        load_source(f"npz:{p}")


def test_unknown_spec_and_missing_torchvision_root(tmp_path):
    with pytest.raises(UsageError, match="unknown data spec"):
        load_source("imagenet")
    with pytest.raises(InputError, match="--download"):
        load_source("cifar10", root=tmp_path / "nothing")


def test_digits_fast_path_equals_load_digits():
    from sklearn.datasets import load_digits

    from kdfine.data.sources import _digits_arrays

    images, labels = _digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target)
