"""The data layer through the commands: --stream/--no-stream and the memory budget, --strict and
``skipped`` in --json, --resize, non-square photos, an unwritable cache, streamed batches across
ranks. Tiny image folders, one or two epochs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import read_json, torchrun, write_png_tree
from kdfine.data.batches import StreamBatches, TrainBatches
from kdfine.files.rows import file_rows
from kdfine.data.sources import load_source
from kdfine.train.run import arch_augment

TRAIN = ["train-teacher", "--arch", "cnn-8", "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--device", "cpu",
         "--augment", "crop-flip", "--json", "-q"]


def _weights(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return write_png_tree(tmp_path_factory.mktemp("data") / "pets", per_class=8, size=12)


@pytest.fixture(scope="module")
def with_corrupt(tmp_path_factory) -> tuple[Path, Path]:
    root = write_png_tree(tmp_path_factory.mktemp("data") / "broken", per_class=6, size=10)
    bad = root / "train" / "dog" / "zz-truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root, bad


def test_streamed_and_in_memory_training_give_the_same_model(cli, pets, tmp_path):
    """The same seed trains the same weights whichever path feeds the batches, with --keep and
    dynamic FINE re-selecting from the streamed set (the budget's choice through the CLI: the
    DivideMix test below; its rule: test_batches)."""
    keep = tmp_path / "keep.csv"
    keep.write_text("index\n" + "\n".join(str(i) for i in range(0, 24, 1) if i % 5) + "\n")
    args = [*TRAIN, "--data", f"imagefolder:{pets}", "--keep", keep, "--fine-every", "1", "--fine-warmup", "1"]
    runs = {}
    for name, flag in [("stream", "--stream"), ("memory", "--no-stream")]:
        out = tmp_path / f"{name}.safetensors"
        r = cli(*args, flag, "--out", out)
        assert r.returncode == 0, r.stderr
        runs[name] = (read_json(r.stdout), _weights(out))
    assert [runs[k][0]["streamed"] for k in ("stream", "memory")] == [True, False]
    hist = {k: [(h["loss"], h.get("fine_kept")) for h in doc["epochs"]] for k, (doc, _) in runs.items()}
    assert hist["stream"] == hist["memory"]
    assert hist["stream"][1][1] is not None  # FINE ran in epoch 2
    w = runs["memory"][1]
    assert w.keys() == runs["stream"][1].keys()
    assert all(np.array_equal(w[k], runs["stream"][1][k]) for k in w)
    # a student distilled from the streamed set
    r = cli("distill", "--teacher", tmp_path / "stream.safetensors", "--arch", "cnn-8", "--epochs", "1", "--batch-size",
            "8", "--device", "cpu", "--stream", "--json", "-q", "--out", tmp_path / "s.safetensors")
    assert r.returncode == 0, r.stderr
    assert read_json(r.stdout)["streamed"] is True


def test_an_unreadable_file_is_skipped_and_listed_or_with_strict_an_error(cli, with_corrupt, tmp_path):
    root, bad = with_corrupt
    out = tmp_path / "t.safetensors"
    r = cli(*TRAIN, "--epochs", "1", "--data", f"imagefolder:{root}", "--strict", "--out", out)
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "zz-truncated.png" in lines[0] and "--strict" in lines[0], r.stderr
    assert not out.exists()
    r = cli(*TRAIN[:-1], "--epochs", "1", "--data", f"imagefolder:{root}", "--out", out)
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("kdfine: warning:")]
    assert len(warned) == 1 and "skipped 1 unreadable" in warned[0] and "zz-truncated.png" in warned[0]
    doc = read_json(r.stdout)
    assert [Path(s["file"]).name for s in doc["skipped"]] == [bad.name] and doc["skipped"][0]["reason"]
    r = cli("eval", "--model", out, "--split", "train", "--device", "cpu", "--json", "-q")
    assert r.returncode == 0, r.stderr
    ev = read_json(r.stdout)
    assert ev["n"] == 18 and [Path(s["file"]).name for s in ev["skipped"]] == [bad.name]
    r = cli("clean", "--model", out, "--out", tmp_path / "clean.csv", "--device", "cpu", "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert [Path(s["file"]).name for s in read_json(r.stdout)["skipped"]] == [bad.name]
    r = cli("eval", "--model", out, "--device", "cpu", "--strict", "--json", "-q")  # eval takes --strict too
    assert r.returncode == 3 and "zz-truncated.png" in r.stderr


def test_non_square_photos_are_recorded_square_and_resize_is_inherited(cli, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "wide"
    for ci, c in enumerate(("a", "b")):
        (root / c).mkdir(parents=True)
        for i in range(10):
            img = np.zeros((9, 15, 3), np.uint8)
            img[..., ci] = 180 + rng.integers(0, 60, (9, 15))
            Image.fromarray(img).save(root / c / f"{i}.png")
    out = tmp_path / "t.safetensors"
    r = cli(*TRAIN, "--epochs", "1", "--data", f"imagefolder:{root}", "--resize", "squash", "--image-size", "8",
            "--out", out)
    assert r.returncode == 0, r.stderr
    r = cli("info", out, "--json")
    meta = read_json(r.stdout)
    assert meta["image_size"] == 8 and meta["in_channels"] == 3
    assert meta["config"]["resize"] == "squash" and meta["config"]["decoded"]["source_sizes"] == ["15x9"]
    assert "cache" not in meta["config"]["decoded"]
    r = cli("eval", "--model", out, "--device", "cpu", "--json", "-q")  # data, size and squash inherited
    assert r.returncode == 0, r.stderr
    r = cli(*TRAIN, "--epochs", "1", "--data", f"imagefolder:{root}", "--out", tmp_path / "c.safetensors")
    assert r.returncode == 0, r.stderr  # no --image-size: square at the shorter side
    assert read_json(cli("info", tmp_path / "c.safetensors", "--json").stdout)["image_size"] == 9
    r = cli(*TRAIN, "--data", f"imagefolder:{root}", "--resize", "fit", "--out", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "'fit'" in r.stderr


def test_an_unwritable_cache_only_costs_time(cli, pets, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be\n")
    out = tmp_path / "t.safetensors"
    r = cli(*TRAIN[:-1], "--epochs", "1", "--data", f"imagefolder:{pets}", "--stream", "--out", out,
            env={"KDFINE_CACHE": str(blocker)})
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("kdfine: warning:")]
    assert len(warned) == 1 and "cache" in warned[0], r.stderr
    assert out.exists() and blocker.read_text().startswith("a file")


def test_streamed_ranks_read_their_slices_and_assemble_the_one_process_batches(tmp_path):
    """Each rank's StreamBatches reads only its slice of every global batch from the cache's memory
    map, and the slices put together are the single-process in-memory batches."""
    root = write_png_tree(tmp_path / "t", per_class=10, size=10, test=False)
    src = load_source(f"imagefolder:{root}", test_fraction=0.2, quiet=True).train
    assert file_rows(src.images) is not None  # memory-mapped from the cache file: rows are read with preadv
    kw = dict(batch_size=8, device=torch.device("cpu"), augment="crop-flip", seed=3)
    one = list(TrainBatches(src.images, src.labels, src.mean, src.std, **kw).epoch(2))
    ranks = [list(StreamBatches(src.images, src.labels, src.mean, src.std, rank=r, world_size=2, **kw).epoch(2))
             for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
    for step, (x, y, i) in enumerate(one):
        parts = [ranks[r][step] for r in range(2)]
        assert all(p[0].shape[0] == 4 for p in parts)
        assert torch.equal(torch.cat([p[2] for p in parts]), i) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)


def test_rrc_flip_is_the_default_for_library_archs_at_96_px_and_up():
    assert arch_augment("tv:resnet18", 224, "crop-flip") == "rrc-flip"
    assert arch_augment("timm:resnet10t", 96, "none") == "rrc-flip"
    assert arch_augment("tv:resnet18", 64, "crop-flip") == "crop-flip"  # small images keep the data's default
    assert arch_augment("wrn-16-1", 224, "crop-flip") == "crop-flip"  # built-in networks keep theirs


def test_stream_under_torchrun(tmp_path, pets):
    """A real 2-process torchrun job trains from the streamed cache."""
    out = tmp_path / "ddp.safetensors"
    r = torchrun(*TRAIN, "--epochs", "1", "--data", f"imagefolder:{pets}", "--stream", "--out", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["streamed"] is True and out.exists() and doc["epochs"][0]["train_images"] == 24


def test_dividemix_is_refused_up_front_when_the_set_is_streamed(cli, pets, tmp_path):
    """DivideMix draws second views of any image at any time: streaming is refused before training,
    whether asked for or chosen by the memory budget; nothing is written."""
    out = tmp_path / "t.safetensors"
    base = [*TRAIN, "--data", f"imagefolder:{pets}", "--fine-strategy", "dividemix", "--fine-every", "1",
            "--out", out]
    for extra, env in (["--stream"], None), ([], {"KDFINE_MEMORY_BUDGET": "1K"}):
        r = cli(*base, *extra, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--no-stream" in lines[0], r.stderr
        assert ("KDFINE_MEMORY_BUDGET" in lines[0]) == (env is not None)
        assert not out.exists() and not Path(f"{out}.state.safetensors").exists()


def test_a_torchvision_arch_at_96_px_trains_with_rrc_flip_by_default(cli, pets, tmp_path):
    """The wiring of arch_augment (its rule is checked above): no --augment, a tv: arch, 96 px."""
    out = tmp_path / "tv.safetensors"
    r = cli("train-teacher", "--arch", "tv:mobilenet_v3_small", "--epochs", "1", "--batch-size", "8", "--device",
            "cpu", "--data", f"imagefolder:{pets}", "--image-size", "96", "-q", "--out", out)
    assert r.returncode == 0, r.stderr
    assert read_json(cli("info", out, "--json").stdout)["config"]["train_augment"] == "rrc-flip"
