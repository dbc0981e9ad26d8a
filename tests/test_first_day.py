"""A new user's first day with their own photos and weights (issue 30): initial weights checked
before the data, the normalisation of --init weights (--norm), what the training header says,
and the text and JSON that name things (paths, class names, skipped files, help)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import write_png_tree
from kdfine import api
from kdfine.data.norm import IMAGENET, parse_norm, per_channel, resolve
from kdfine.errors import InputError, UsageError
from kdfine.models.checkpoint import read_meta
from kdfine.models.weights import read_state_dict
from kdfine.options import DataOptions, ModelOptions, TrainConfig


# ------------------------------------------------------------------------------ initial weights

@pytest.fixture
def pickled_model(tmp_path):
    """A whole network saved with torch.save(model): pickled objects, which kdfine never loads."""
    path = tmp_path / "ours.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    return path


def test_a_pickled_model_as_init_says_to_save_its_state_dict(pickled_model, tmp_path):
    with pytest.raises(InputError) as e:
        read_state_dict(pickled_model)
    assert "torch.save(model.state_dict(), PATH)" in str(e.value) and "\x1b" not in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02 not a pickle at all")
    with pytest.raises(InputError, match="not a readable state dict") as e:
        read_state_dict(junk)
    assert "\x1b" not in str(e.value) and "state_dict()" not in str(e.value)


def test_init_is_checked_before_the_data_loads(pickled_model, tmp_path):
    missing = DataOptions(f"imagefolder:{tmp_path / 'no-such-folder'}")
    with pytest.raises(InputError, match="ours.pth: holds pickled Python objects"):
        api.train_teacher(str(tmp_path / "t.safetensors"), arch="cnn", data=missing,
                          model=ModelOptions(init=str(pickled_model)), device="cpu", quiet=True)
    with pytest.raises(InputError, match="no-such-folder"):  # the data's own error, once the weights are fine
        api.train_teacher(str(tmp_path / "t.safetensors"), arch="cnn", data=missing, device="cpu", quiet=True)


# ------------------------------------------------------------------------------ normalisation

def test_norm_specs_parse_and_resolve_per_channel():
    assert parse_norm("imagenet") == ("imagenet", IMAGENET) and parse_norm("Data") == ("data", None)
    assert parse_norm("0.5/0.25") == ("custom", ((0.5,), (0.25,)))
    for bad in ("0.5", "a/b", "0.5/0", "0.1,0.2/0.3", "nan/1", "/"):
        with pytest.raises(UsageError, match="--norm"):
            parse_norm(bad)
    assert per_channel((0.5,), 3) == (0.5, 0.5, 0.5) and per_channel(IMAGENET[0], 1) == pytest.approx((0.449,))
    with pytest.raises(UsageError, match="3 values for images of 2 channels"):
        per_channel(IMAGENET[0], 2)
    own = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert resolve(None, 3, own, None) == (own, "the training images' own")
    assert resolve(None, 3, own, IMAGENET)[1] == "the pretrained weights'"
    assert resolve("imagenet", 1, own, None)[0][1] == pytest.approx((0.226,))
    with pytest.raises(UsageError, match="--norm weights: needs --pretrained"):
        ModelOptions(norm="weights").validate()


def test_init_weights_get_their_own_normalisation_and_the_header_says_so(tmp_path, capsys):
    root = write_png_tree(tmp_path / "photos", per_class=4, size=12)
    first = tmp_path / "ours.safetensors"
    api.train_teacher(str(first), arch="cnn", data=DataOptions(f"imagefolder:{root}"),
                      cfg=TrainConfig(epochs=1, batch_size=4), device="cpu", quiet=True)
    out = tmp_path / "t.safetensors"
    api.train_teacher(str(out), arch="cnn", data=DataOptions(f"imagefolder:{root}"),
                      cfg=TrainConfig(epochs=1, batch_size=4), model=ModelOptions(init=str(first), norm="imagenet"),
                      device="cpu")
    meta = read_meta(out)
    assert meta["mean"] == pytest.approx(list(IMAGENET[0])) and meta["std"] == pytest.approx(list(IMAGENET[1]))
    assert meta["config"]["norm"] == "imagenet"
    err = capsys.readouterr().err
    assert "input 12x12 px, augmentation " in err
    assert "normalised with ImageNet's mean 0.485,0.456,0.406 std 0.229,0.224,0.225" in err
    with pytest.raises(UsageError, match=r"norm: 'imagenet' -> None"):  # a resume compares the normalisation
        shutil.copy(out, tmp_path / "again.safetensors")
        api.train_teacher(str(tmp_path / "again.safetensors"), arch="cnn", data=DataOptions(f"imagefolder:{root}"),
                          cfg=TrainConfig(epochs=1, batch_size=4), model=ModelOptions(init=str(first)),
                          device="cpu", resume=True, quiet=True)


def test_the_header_names_the_original_size_when_images_are_resized(tmp_path, capsys):
    api.train_teacher(str(tmp_path / "t.safetensors"), data=DataOptions("digits", image_size=16),
                      cfg=TrainConfig(epochs=1, batch_size=256), device="cpu")
    err = capsys.readouterr().err
    assert "input 16x16 px (resized from 8x8, 2.0x), augmentation none, normalised with the training images' own" in err
    assert "upscaled" not in err  # the user's own --image-size: no warning


def test_distill_with_ce_says_that_the_teacher_is_not_used(digits_teacher, tmp_path, capsys):
    api.distill(str(tmp_path / "s.safetensors"), [str(digits_teacher)], arch="cnn",
                cfg=TrainConfig(epochs=1, loss="ce"), device="cpu")
    assert "--loss ce: the student learns from the labels alone; the teacher is not used" in capsys.readouterr().err


# ------------------------------------------------------------------------------ text and JSON

def test_eval_table_keeps_whole_paths_of_same_named_models(digits_teacher, tmp_path, cli):
    paths = []
    for folder in ("runs/a-long-experiment-name-one", "runs/a-long-experiment-name-two"):
        (tmp_path / folder).mkdir(parents=True)
        paths.append(tmp_path / folder / "teacher.safetensors")
        shutil.copy(digits_teacher, paths[-1])
    r = cli("eval", "--model", paths[0], "--model", paths[1])  # stderr is a pipe, not a terminal
    assert r.returncode == 0, r.stderr
    assert str(paths[0]) in r.stderr and str(paths[1]) in r.stderr and "…" not in r.stderr


def test_detection_report_names_the_classes(tmp_path, cli):
    from kdfine.detect.dump import write_dump

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    feats = rng.normal(size=(60, 4)).astype(np.float32) + np.eye(4, dtype=np.float32)[labels] * 3
    info = {"classes": ["airplane", "bird", "cat"], "num_classes": 3, "data": "npz:x.npz", "split": "train"}
    write_dump(tmp_path / "f.npy", feats, np.zeros((60, 3), np.float32), labels, info)
    r = cli("detect-noise", "--features", tmp_path / "f.npy", "--out", tmp_path / "k.csv")
    assert r.returncode == 0, r.stderr
    assert "airplane" in r.stderr and "cat" in r.stderr
    r = cli("detect-noise", "--features", tmp_path / "f.npy", "--out", tmp_path / "k2.csv", "--json")
    assert [c["name"] for c in json.loads(r.stdout)["classes"]] == ["airplane", "bird", "cat"]


def test_predict_json_lists_missing_paths_as_skipped(digits_teacher, tmp_path, cli):
    from PIL import Image

    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "one.png")
    r = cli("predict", "--model", digits_teacher, tmp_path / "one.png", tmp_path / "gone.png", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    gone = {"path": str(tmp_path / "gone.png"), "reason": "no such file or folder"}
    assert doc["n"] == 1 and doc["skipped"] == [gone]


def test_export_help_keeps_the_extra_in_brackets(cli):
    r = cli("export", "--help")
    assert r.returncode == 0 and "kdfine[export]" in r.stdout
