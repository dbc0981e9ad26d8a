"""Checkpoints: the file alone rebuilds the model; metadata; atomic writes; clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdfine.models import checkpoint
from kdfine.errors import InputError
from kdfine.models import build

META = {"arch": "cnn-8", "num_classes": 4, "in_channels": 1, "image_size": 8, "mean": [0.3], "std": [0.2],
        "classes": ["a", "b", "c", "d"], "data": "digits", "stage": "teacher", "tau": 4.0, "metrics": {"top1": 0.5},
        "parents": []}


def _model():
    torch.manual_seed(0)
    m = build("cnn-8", 4, 1, 8)
    m.train()
    m(torch.randn(16, 1, 8, 8))  # move BatchNorm running statistics off their defaults
    return m.eval()


def test_roundtrip_rebuilds_the_same_function(tmp_path):
    m = _model()
    p = tmp_path / "m.safetensors"
    sha = checkpoint.save(p, m, META)
    ck = checkpoint.load(p)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ck.model(x), m(x))
    assert ck.sha256 == sha == checkpoint.file_sha256(p)
    assert ck.meta["classes"] == ["a", "b", "c", "d"] and ck.meta["metrics"] == {"top1": 0.5}
    assert ck.meta["tau"] == 4.0 and ck.num_classes == 4 and not ck.model.training
    with safe_open(str(p), "pt") as f:
        raw = f.metadata()
    assert raw["format"] == "pt" and raw["schema"] == checkpoint.SCHEMA and json.loads(raw["classes"])[0] == "a"
    assert [q.name for q in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_channels_last_models_save(tmp_path):
    m = _model().to(memory_format=torch.channels_last)
    checkpoint.save(tmp_path / "cl.safetensors", m, META)
    assert checkpoint.load(tmp_path / "cl.safetensors").arch == "cnn-8"


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        checkpoint.load(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match="not a kdfine checkpoint"):
        checkpoint.load(plain)
    wrong = tmp_path / "wrong.safetensors"
    checkpoint.save(wrong, _model(), {**META, "arch": "cnn-16"})
    with pytest.raises(InputError, match="do not match its recorded arch cnn-16"):
        checkpoint.load(wrong)
    good = tmp_path / "good.safetensors"
    checkpoint.save(good, _model(), META)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputError, match="cut.safetensors"):
        checkpoint.load(cut)
    with pytest.raises(InputError, match="no such file"):
        checkpoint.load(tmp_path / "missing.safetensors")
