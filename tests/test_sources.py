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
from kdfine.errors import InputError, KdfineWarning, UsageError
from kdfine.options import DataOptions


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
    again = load_source(f"imagefolder:{root}")
    assert Path(again.info["cache"]) == entry and again.fingerprint == first.fingerprint
    # Overwrite one image with different pixels of the same byte size and mtime (as `touch -r`
    # does): the entry's key (names, sizes, mtimes) is unchanged, but the file's ctime is not, so
    # its bytes are hashed again and the entry, decoded from other bytes, is decoded again.
    f = root / "train" / "cat" / "000.png"
    st = f.stat()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    data = f.read_bytes()
    f.write_bytes(data[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(KdfineWarning, match="changed in place"):
        second = load_source(f"imagefolder:{root}")
    assert second.fingerprint != first.fingerprint
    assert not second.train.images[0].any() and first.train.images[0].any()
    assert np.array_equal(second.train.images[1:], first.train.images[1:])
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


# ------------------------------------------------------------------------------ photos as they come

def _save(path, array, **kw):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(path, **kw)
    return path


def test_a_grey_first_colour_folder_decodes_in_colour(tmp_path):
    root = write_png_tree(tmp_path / "t", per_class=4, size=8, test=False)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    _save(root / "cat" / "000.png", grey)  # the very first file is greyscale
    src = load_source(f"imagefolder:{root}")
    assert src.train.in_channels == 3 and src.info["channels"] == 3
    files = src.train.files + src.test.files
    x = np.concatenate([src.train.images, src.test.images])[files.index(str((root / "cat" / "000.png").resolve()))]
    assert np.array_equal(x[..., 0], grey) and np.array_equal(x[..., 1], grey) and np.array_equal(x[..., 2], grey)


def test_unreadable_files_are_skipped_and_reported_or_fatal_with_strict(tmp_path):
    root = write_png_tree(tmp_path / "t", per_class=6, size=8)
    (root / "train" / "dog" / "bad.png").write_bytes(b"not a png at all")
    good = root / "train" / "fox" / "001.png"
    (root / "train" / "fox" / "cut.png").write_bytes(good.read_bytes()[:60])  # a valid header, truncated data
    (root / "train" / "fox" / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\), the first .*bad.png") as rec:
        src = load_source(f"imagefolder:{root}")
    assert len([w for w in rec if "unreadable" in str(w.message)]) == 1
    assert sorted(Path(s["file"]).name for s in src.skipped) == ["bad.png", "cut.png"]
    assert len(src.train) == 18 and not any("bad.png" in f or "cut.png" in f for f in src.train.files)
    manifest = __import__("json").loads((Path(src.info["cache"]) / "manifest.json").read_text())
    assert sorted(Path(s["file"]).name for s in manifest["splits"]["train"]["skipped"]) == ["bad.png", "cut.png"]
    with pytest.raises(InputError, match="2 unreadable image file.*--strict"):
        load_source(f"imagefolder:{root}", strict=True)  # from the cache entry: still an error


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    # stored landscape 16x8, left half red; orientation 6 means "rotate 90 degrees clockwise to view"
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = (255, 0, 0)
    a[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / "t"
    for i in range(3):
        _save(root / "c" / f"{i}.jpg", a, exif=exif.tobytes(), quality=95)
    src = load_source(f"imagefolder:{root}", image_size=8, test_fraction=0.34)
    x = src.train.images[0].astype(int)  # upright: 8 wide, 16 tall, red on top; cropped to the centre 8x8
    assert src.train.images.shape[1:] == (8, 8, 3)
    top, bottom = x[:3].mean((0, 1)), x[5:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_sixteen_bit_is_scaled_and_alpha_and_palette_lie_on_white(tmp_path):
    from PIL import Image

    root = tmp_path / "t"
    deep = np.array([[0, 257 * 128], [65535, 257 * 10]], np.uint16)
    _save(root / "a" / "deep.png", Image.fromarray(deep))  # mode I;16
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent
    _save(root / "a" / "rgba.png", rgba)
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 255, 0, 0, 0, 0])
    _save(root / "b" / "pal.png", pal, transparency=1)
    _save(root / "b" / "plain.png", np.full((2, 2, 3), 7, np.uint8))
    src = load_source(f"imagefolder:{root}", test_fraction=0.5)
    both = dict(zip(src.train.files + src.test.files, np.concatenate([src.train.images, src.test.images])))
    get = lambda name: both[str((root / name).resolve())]
    assert get("a/deep.png")[..., 0].tolist() == [[0, 128], [255, 10]]  # scaled, not clipped at 255
    assert get("a/rgba.png")[0, 0].tolist() == [255, 0, 0] and get("a/rgba.png")[1, 1].tolist() == [255, 255, 255]
    assert get("b/pal.png")[0, 0].tolist() == [0, 255, 0] and get("b/pal.png")[0, 1].tolist() == [255, 255, 255]


def test_empty_class_folder_warns_and_an_unreadable_split_fails(tmp_path):
    root = write_png_tree(tmp_path / "t", per_class=3, size=8)
    (root / "train" / "owl").mkdir()
    with pytest.warns(UserWarning, match="class folder.*hold no image.*owl"):
        src = load_source(f"imagefolder:{root}")
    assert src.train.classes == ["cat", "dog", "fox"]
    for f in (root / "test").rglob("*.png"):
        f.write_bytes(b"garbage")
    with pytest.raises(InputError, match="the test split has no readable image"), pytest.warns(UserWarning):
        load_source(f"imagefolder:{root}")


def test_mixed_sizes_are_centre_cropped_or_squashed(tmp_path):
    root = tmp_path / "t"
    wide = np.zeros((8, 24, 3), np.uint8)
    wide[:, 8:16] = 255  # a white middle third: the centre crop is all white
    for i in range(3):
        _save(root / "c" / f"w{i}.png", wide)
        _save(root / "c" / f"s{i}.png", np.full((4, 4, 3), 9, np.uint8))
    crop = load_source(f"imagefolder:{root}", image_size=8, test_fraction=0.34)
    squash = load_source(f"imagefolder:{root}", image_size=8, test_fraction=0.34, resize="squash")
    name = str((root / "c" / "w1.png").resolve())
    pick = lambda s: np.concatenate([s.train.images, s.test.images])[(s.train.files + s.test.files).index(name)]
    assert pick(crop).min() == 255
    assert pick(squash)[:, 0].max() < 60 and pick(squash)[:, 4].min() > 200
    with pytest.raises(UsageError, match="--resize 'fit'"):  # checked by the options, before any decode
        DataOptions(f"imagefolder:{root}", image_size=8, resize="fit").validate()


def test_non_square_images_of_one_size_become_square(tmp_path):
    root = tmp_path / "t"
    for i in range(4):
        _save(root / "c" / f"{i}.png", np.full((6, 10, 3), 40 * i, np.uint8))
    src = load_source(f"imagefolder:{root}", test_fraction=0.25)
    assert src.train.images.shape[1:] == (6, 6, 3) and src.train.image_size == 6
    assert src.info["source_sizes"] == ["10x6"] and src.info["image_size"] == 6
