"""On-device batching: seeded order, correct crops/flips/normalisation, rank slicing."""

from __future__ import annotations

import numpy as np
import torch

from kdfine.data.batches import PAD, TrainBatches, eval_batches


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
