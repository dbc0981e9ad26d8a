"""On-device batching: seeded order, correct crops/flips/normalisation, rank slicing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kdfine.data import cache
from kdfine.data.batches import (PAD, StreamBatches, TrainBatches, eval_batches, rrc_boxes, should_stream,
                                 train_batches)
from kdfine.errors import UsageError


def _images(n=37, h=6, w=5, c=3):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), rng.integers(0, 4, n)


def _batches(images, labels, **kw):
    kw.setdefault("batch_size", 8)
    return TrainBatches(images, labels, (0.0,) * images.shape[3], (1.0,) * images.shape[3],
                        device=torch.device("cpu"), **kw)


def test_epoch_order_is_seeded_and_covers_the_selection():
    x, y = _images()
    b = _batches(x, y, seed=3)
    first = torch.cat([i for _, _, i in b.epoch(0)]).tolist()
    assert first == torch.cat([i for _, _, i in _batches(x, y, seed=3).epoch(0)]).tolist()
    assert first != torch.cat([i for _, _, i in b.epoch(1)]).tolist()
    assert len(first) == len(b) * 8 == 32 and len(set(first)) == 32  # last partial batch dropped
    b.set_selection(np.array([1, 5, 9, 11, 20, 30, 31, 36, 2, 3]))
    idx = torch.cat([i for _, _, i in b.epoch(0)]).tolist()
    assert set(idx) <= {1, 5, 9, 11, 20, 30, 31, 36, 2, 3} and len(idx) == 8


def test_labels_follow_indices_and_values_are_normalised():
    x, y = _images()
    b = TrainBatches(x, y, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), batch_size=8, device=torch.device("cpu"))
    xb, yb, ib = next(b.epoch(0))
    assert torch.equal(yb, torch.as_tensor(y)[ib])
    raw = torch.from_numpy(x[ib.numpy()]).permute(0, 3, 1, 2).float() / 255
    expect = (raw - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(xb, expect, atol=1e-5)


def test_crop_is_a_shifted_window_of_the_zero_padded_image_and_flip_mirrors():
    x, y = _images(n=64, h=8, w=8, c=1)
    b = _batches(x, y, augment="crop-flip", batch_size=64)
    xb, _, ib = next(b.epoch(0))
    got = (xb * 255).round().to(torch.uint8)[:, 0]
    padded = np.pad(x[..., 0], ((0, 0), (PAD, PAD), (PAD, PAD)))
    matched_flip = 0
    for k, i in enumerate(ib.tolist()):
        windows = {(dy, dx): padded[i, dy:dy + 8, dx:dx + 8] for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)}
        g = got[k].numpy()
        plain = any(np.array_equal(g, w) for w in windows.values())
        flipped = any(np.array_equal(g, w[:, ::-1]) for w in windows.values())
        assert plain or flipped
        matched_flip += flipped and not plain
    assert 10 < matched_flip < 54  # about half the images are flipped


def test_ranks_take_slices_of_the_same_global_batches():
    x, y = _images(n=40)
    whole = [i for _, _, i in _batches(x, y, seed=1, augment="crop-flip").epoch(2)]
    r0 = [i for _, _, i in _batches(x, y, seed=1, augment="crop-flip", rank=0, world_size=2).epoch(2)]
    r1 = [i for _, _, i in _batches(x, y, seed=1, augment="crop-flip", rank=1, world_size=2).epoch(2)]
    for w, a, c in zip(whole, r0, r1):
        assert torch.equal(w, torch.cat([a, c]))
    xw = next(_batches(x, y, seed=1, augment="crop-flip").epoch(0))[0]
    xa = next(_batches(x, y, seed=1, augment="crop-flip", rank=0, world_size=2).epoch(0))[0]
    assert torch.equal(xw[:4], xa)  # same augmentation, whatever the number of processes


def test_eval_batches_keep_order_without_augmentation():
    x, _ = _images(n=10)
    out = torch.cat(list(eval_batches(x, (0, 0, 0), (1, 1, 1), batch_size=4, device=torch.device("cpu"))))
    assert torch.allclose(out, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)


def _mapped(tmp_path, images):
    """``images`` written through the decode cache's sink and read back as its memory map."""
    sink = cache.ArraySink(images.shape[1:], len(images), tmp_path / "x.npy")
    for lo in range(0, len(images), 7):
        sink.append(images[lo:lo + 7])
    return sink.finish()


@pytest.mark.parametrize("augment", ["none", "crop-flip", "rrc-flip"])
def test_streamed_batches_equal_the_in_memory_ones(tmp_path, augment):
    x, y = _images(n=45, h=9, w=9)
    mapped = _mapped(tmp_path, x)
    assert isinstance(mapped.base, __import__("mmap").mmap) and np.array_equal(mapped, x)
    kw = dict(batch_size=8, device=torch.device("cpu"), augment=augment, seed=5)
    for rank, world in ((0, 1), (1, 2)):
        mem = TrainBatches(x, y, (0.4,) * 3, (0.3,) * 3, rank=rank, world_size=world, **kw)
        streamed = StreamBatches(mapped, y, (0.4,) * 3, (0.3,) * 3, rank=rank, world_size=world, prefetch=2, **kw)
        for b in (mem, streamed):
            b.set_selection(np.arange(3, 45))
        for epoch in (0, 3):
            a, c = list(mem.epoch(epoch)), list(streamed.epoch(epoch))
            assert len(a) == len(c) == 5
            for (xa, ya, ia), (xc, yc, ic) in zip(a, c):
                assert torch.equal(xa, xc) and torch.equal(ya, yc) and torch.equal(ia, ic)


def test_an_abandoned_streamed_epoch_stops_its_thread(tmp_path):
    x, y = _images(n=64)
    b = StreamBatches(_mapped(tmp_path, x), y, (0,) * 3, (1,) * 3, batch_size=4, device=torch.device("cpu"),
                      prefetch=2)
    it = b.epoch(0)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "kdfine-stream"]


def test_rrc_boxes_follow_the_recipe_and_the_seed():
    g = torch.Generator().manual_seed(0)
    boxes = rrc_boxes(4000, 24, 32, g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    share = w * h / (24 * 32)
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 32 and boxes[:, 3].max() <= 24
    assert share.min() >= 0.07 and share.max() <= 1.0 and 0.2 < share.median() < 0.7
    # aspect 3/4 .. 4/3 up to rounding each side to whole pixels
    assert ((w + 0.5) / (h - 0.5)).min() >= 0.75 and ((w - 0.5) / (h + 0.5)).max() <= 4 / 3
    assert torch.equal(boxes, rrc_boxes(4000, 24, 32, torch.Generator().manual_seed(0)))


def test_rrc_flip_resizes_each_box_bilinearly():
    # a horizontal ramp (value 8 * column) makes every output pixel a known linear function of its box
    n, s = 64, 16
    x = np.broadcast_to((8 * np.arange(s, dtype=np.uint8))[None, None, :, None], (n, s, s, 1)).copy()
    b = _batches(x, np.zeros(n, np.int64), augment="rrc-flip", batch_size=n, seed=2)
    d = b.draws(0)
    xb, _, _ = next(b.epoch(0))
    boxes, flips = d.boxes.numpy(), d.flips.numpy()
    flipped = 0
    for k in range(n):
        x1, _, x2, _ = boxes[k]
        centres = x1 + (np.arange(s) + 0.5) * (x2 - x1) / s - 0.5
        expect = 8 * np.clip(centres, 0, s - 1)
        got = xb[k, 0].numpy() * 255
        if flips[k]:
            got, flipped = got[:, ::-1], flipped + 1
        assert np.allclose(got, expect[None, :], atol=1e-3)
    assert 15 < flipped < 49


def test_stream_choice_follows_the_memory_budget(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("KDFINE_MEMORY_BUDGET", "1M")
    assert not should_stream((100, 32, 32, 3), "crop-flip", cpu)  # 480 KB padded
    assert should_stream((1000, 32, 32, 3), "none", cpu)  # 3 MB
    assert not should_stream((1000, 32, 32, 3), "none", cpu, stream=False)
    assert should_stream((10, 8, 8, 1), "none", cpu, stream=True)
    x, y = _images(n=400, h=32, w=32)  # 1.2 MB: over the budget
    assert type(train_batches(x, y, (0,) * 3, (1,) * 3, batch_size=8, device=cpu)) is StreamBatches
    monkeypatch.setenv("KDFINE_MEMORY_BUDGET", "2.5g")
    assert type(train_batches(x, y, (0,) * 3, (1,) * 3, batch_size=8, device=cpu)) is TrainBatches
    monkeypatch.setenv("KDFINE_MEMORY_BUDGET", "lots")
    with pytest.raises(UsageError, match="KDFINE_MEMORY_BUDGET"):
        should_stream((10, 8, 8, 1), "none", cpu)
    monkeypatch.delenv("KDFINE_MEMORY_BUDGET")
    assert not should_stream((10, 8, 8, 1), "none", cpu)  # a share of the available memory
