"""The one image decoder (kdfine.data.decode): training and predict see the same pixels.

A folder of awkward images (EXIF orientations 3, 6 and 8, RGBA and palette transparency, 16-bit
grey, CMYK, grey images beside colour ones, non-square, far larger than the input, and a
decompression bomb) trains a tiny model; ``predict`` on the same files must give the
probabilities that ``eval`` computes from the decode cache, to 1e-5, under ``--resize crop`` and
``--resize squash``, for a colour and a grey model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import awkward_folder, awkward_images, bomb_png, gradient_image
from kdfine import api
from kdfine.data.decode import DecodeSpec, TooManyPixels, decode, max_pixels, probe
from kdfine.errors import UsageError
from kdfine.options import DataOptions, TrainConfig

SIZE = 16


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _probabilities(rows: list[dict], classes: list[str]) -> np.ndarray:
    """Every class's probability per predicted row (rows from predict with top_k = K)."""
    return np.array([[dict(zip(r["labels"], r["probs"]))[c] for c in classes] for r in rows])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per (resize, colour): the awkward folder and a cnn trained on it for one epoch."""
    made = {}

    def get(resize: str, colour: bool) -> tuple[Path, Path]:
        if (resize, colour) not in made:
            d = tmp_path_factory.mktemp(f"awkward-{resize}-{colour}")
            root = awkward_folder(d / "data", colour)
            ck = d / "m.safetensors"
            with pytest.warns(UserWarning, match="bomb.png"):
                api.train_teacher(str(ck), arch="cnn-8", data=DataOptions(f"imagefolder:{root}", image_size=SIZE,
                                                                          resize=resize),
                                  cfg=TrainConfig(epochs=1, batch_size=8), device="cpu", quiet=True)
            made[resize, colour] = (root, ck)
        return made[resize, colour]

    return get


@pytest.mark.parametrize("resize,colour", [("crop", True), ("squash", True), ("crop", False)])
def test_predict_sees_what_eval_sees(trained, tmp_path, resize, colour):
    root, ck = trained(resize, colour)
    dump = tmp_path / "f.npy"
    with pytest.warns(UserWarning):
        api.evaluate([str(ck)], split="train", dump_features=str(dump), device="cpu", quiet=True)
    logits = np.load(tmp_path / "f.logits.npy")
    with pytest.warns(UserWarning, match="bomb.png: .*400,000,000 pixels, above the limit"):
        doc = api.predict(str(ck), [str(root / "train")], top_k=2, device="cpu")
    assert [s["path"] for s in doc["skipped"]] == [str(root / "train" / c / "bomb.png") for c in ("a", "b")]
    assert doc["decode"]["resize"] == resize and doc["decode"]["channels"] == (3 if colour else 1)
    rows = doc["predictions"]
    assert len(rows) == len(logits) == (11 if colour else 3) * 2
    np.testing.assert_allclose(_probabilities(rows, ["a", "b"]), _softmax(logits), rtol=0, atol=1e-5)


def test_orientation_alpha_and_bits_come_out_as_training_wants(tmp_path):
    """The decoder's own promises, against images built upright by hand."""
    from PIL import Image

    upright = gradient_image(40, 24, 0)
    for o, turn in ((3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        sideways = np.asarray(Image.fromarray(upright).transpose(turn))  # stored turned; the tag turns it back
        exif = Image.Exif()
        exif[0x0112] = o
        Image.fromarray(sideways).save(tmp_path / f"o{o}.png", exif=exif)
        d = decode(tmp_path / f"o{o}.png", DecodeSpec(SIZE, 3, "squash"))
        Image.fromarray(upright).save(tmp_path / "up.png")
        assert d.size == (40, 24) and d.orientation == o
        assert np.array_equal(d.pixels, decode(tmp_path / "up.png", DecodeSpec(SIZE, 3, "squash")).pixels)
    clear = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(clear).save(tmp_path / "clear.png")
    assert (decode(tmp_path / "clear.png", DecodeSpec(8, 3)).pixels == 255).all()  # alpha on white
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert (decode(tmp_path / "white16.png", DecodeSpec(8, 1)).pixels == 255).all()  # scaled, not clipped


def test_grey_decodes_alike_for_one_channel_and_for_the_cache(tmp_path):
    """A grey model's predict decodes to 1 channel; the cache decodes grey folders to 3 and keeps
    channel 0: both must be the same pixels."""
    awkward_images(tmp_path, seed=3, colour=False)
    for f in ("grey16.png", "grey.png", "grey_alpha.png"):
        for resize in ("crop", "squash"):
            one = decode(tmp_path / f, DecodeSpec(SIZE, 1, resize)).pixels
            three = decode(tmp_path / f, DecodeSpec(SIZE, 3, resize)).pixels
            assert np.array_equal(one[..., 0], three[..., 0]) and np.array_equal(three[..., 0], three[..., 2])


def test_record_round_trip_and_decoded_how(tmp_path):
    from PIL import Image

    spec = DecodeSpec(24, 3, "squash", draft=False)
    assert DecodeSpec.from_record(spec.record()) == DecodeSpec(24, 3, "squash", draft=False, max_pixels=spec.max_pixels)
    Image.fromarray(gradient_image(400, 300, 0)).save(tmp_path / "big.jpg")
    d = decode(tmp_path / "big.jpg", DecodeSpec(24, 3))
    how = d.how(DecodeSpec(24, 3))
    assert how["drafted"] is True and how["source_size"] == [400, 300] and how["resize"] == "crop"
    assert d.pixels.shape == (24, 24, 3) and d.pixels.dtype == np.uint8


def test_pixel_limit_refuses_bombs_and_is_configurable(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(TooManyPixels, match="400,000,000 pixels, above the limit of 120,000,000"):
        decode(bomb, DecodeSpec(16, 3))
    with pytest.raises(TooManyPixels):
        probe(bomb)
    monkeypatch.setenv("KDFINE_MAX_PIXELS", "500M")
    assert max_pixels() == 500_000_000
    with pytest.raises(OSError):  # allowed now: Pillow reads on and finds the rows missing
        decode(bomb, DecodeSpec(16, 3))
    small = bomb_png(tmp_path / "small.png", 30, 20)
    monkeypatch.setenv("KDFINE_MAX_PIXELS", "599")
    with pytest.raises(TooManyPixels, match="30x20 = 600 pixels"):
        decode(small, DecodeSpec(16, 3))
    for bad in ("0", "-5", "lots", "1.5M"):
        monkeypatch.setenv("KDFINE_MAX_PIXELS", bad)
        with pytest.raises(UsageError, match="KDFINE_MAX_PIXELS"):
            max_pixels()


def test_image_folder_cache_skips_a_bomb_with_a_warning(tmp_path):
    from kdfine.data.sources import load_source

    from conftest import write_png_tree

    root = write_png_tree(tmp_path / "tree", per_class=3, size=12)
    bomb_png(root / "train" / "cat" / "zz-bomb.png")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\), the first .*zz-bomb.png "
                                         r"\(TooManyPixels: .*400,000,000 pixels"):
        src = load_source(f"imagefolder:{root}")
    assert len(src.train) == 9 and not any("bomb" in f for f in src.train.files)
