"""The recipe options of issue 15 (and the fine-tuning optimizer options of issue 12): schedule
decay factor, Nesterov and weight decay on every parameter, AdamW, warm-up, label smoothing, the
validation split with --keep-best val, and FINE's augmented features. In-process on a slice of
digits with a tiny cnn, plus one CLI run checked against its own per-epoch log."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import digits_slice, stop_after, tiny_cnn
from kdfine.train import resume
from kdfine.models.checkpoint import read_meta
from kdfine.data.augment import apply_draws, augment_draws
from kdfine.data.batches import PAD
from kdfine.data.prepare import split_validation
from kdfine.options import TrainConfig
from kdfine.train.loop import Job, RunFiles, evaluate, fit
from kdfine.errors import UsageError
from kdfine.train.losses import kd_loss
from kdfine.train.optim import build_optimizer, lr_function
from kdfine.train.schedule import parse_schedule
from kdfine.train.progress import Reporter

CPU = torch.device("cpu")
QUIET = Reporter(quiet=True)


@pytest.fixture(scope="module")
def digits():
    return digits_slice(320)


_model = tiny_cnn


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "seed": 1, **kw})




# ------------------------------------------------------------------------------ schedule, optimizer


def test_multistep_with_gamma_gives_the_documented_lr_at_each_epoch():
    # FINE's CIFAR-10 schedule: lr * 0.01 ** (milestones passed), milestones at epochs 40 and 80 of 120
    f = parse_schedule("multistep:40,80:0.01", 120)
    assert [f(t) for t in (0, 39.99, 40, 79.5, 80, 119.9)] == pytest.approx([1, 1, 1e-2, 1e-2, 1e-4, 1e-4])
    assert parse_schedule("multistep:2,4:1", 6)(5) == 1.0
    for bad, msg in [("multistep:2,4:0", "decay factor must lie"), ("multistep:2,4:1.5", "decay factor must lie"),
                     ("multistep:2,4:x", "must be a number"), ("multistep::0.1", "needs its milestones")]:
        with pytest.raises(UsageError, match=msg):
            parse_schedule(bad, 6)


def test_gamma_plain_momentum_and_decay_all_reach_the_optimizer(digits, tmp_path):
    """Through the engine: each epoch's logged lr, and the optimizer saved in the resume state."""
    train, _ = digits
    cfg = _cfg(epochs=5, lr=0.1, schedule="multistep:2,4:0.01", nesterov=False, decay_all=True)
    path = tmp_path / "run.state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(Job(_model(train), train, CPU), cfg, RunFiles(state=path, reporter=stop_after(4)))
    _, info = resume.load_state(path)
    assert [h["lr"] for h in info["history"]] == pytest.approx([0.1, 0.1, 1e-3])
    groups = info["optimizers"][0]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-3)  # the last step of epoch 3 ran at 0.1 * 0.01
    assert groups[0]["nesterov"] is False and groups[0]["momentum"] == 0.9
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["params"] == []  # BatchNorm and biases decayed too
    model = _model(train)
    default = build_optimizer(model, _cfg())
    assert default.param_groups[0]["nesterov"] is True
    n_bn_bias = sum(1 for p in model.parameters() if p.ndim == 1)
    assert len(default.param_groups[1]["params"]) == n_bn_bias > 0  # exempt by default


def test_adamw_decoupled_decay_without_norms_and_biases(digits):
    train, test = digits
    model = _model(train)
    opt = build_optimizer(model, _cfg(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(p.ndim == 1 for p in opt.param_groups[1]["params"])
    r = fit(Job(_model(train), train, CPU, test=test), _cfg(optimizer="adamw", lr=3e-3, epochs=3), RunFiles(reporter=QUIET))
    assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_warmup_ramps_linearly_then_follows_the_schedule():
    f = lr_function(_cfg(epochs=10, warmup_epochs=2, schedule="multistep:5:0.1"))
    assert [f(t) for t in (0, 0.5, 1, 1.5, 2, 4.9, 5)] == pytest.approx([1 / 3, 0.5, 2 / 3, 5 / 6, 1, 1, 0.1])
    assert lr_function(_cfg(epochs=4, schedule="cosine"))(0) == 1.0  # no warm-up: the schedule alone


def test_label_smoothing_is_torchs_and_reaches_training(digits):
    zs, y = torch.randn(6, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 5])
    logp = F.log_softmax(zs, 1)
    want = (0.9 * F.nll_loss(logp, y) + 0.1 * (-logp.mean(1)).mean()).item()
    assert kd_loss(zs, None, y, loss="ce", label_smoothing=0.1).item() == pytest.approx(want)
    zt = torch.randn(6, 10, dtype=torch.float64)
    mixed = kd_loss(zs, zt, y, loss="mse", alpha=0.5, label_smoothing=0.1).item()
    assert mixed == pytest.approx(0.5 * F.mse_loss(zs, zt).item() + 0.5 * want)
    train, _ = digits
    plain = fit(Job(_model(train), train, CPU), _cfg(epochs=1), RunFiles(reporter=QUIET))
    smooth = fit(Job(_model(train), train, CPU), _cfg(epochs=1, label_smoothing=0.3), RunFiles(reporter=QUIET))
    assert smooth.history[0]["loss"] > plain.history[0]["loss"]  # smoothing raises the training loss


# ------------------------------------------------------------------------------ validation, keep-best


def test_validation_split_is_stratified_seeded_and_within_keep():
    labels = np.repeat(np.arange(4), [50, 30, 20, 10])
    tr, val = split_validation(labels, 0.1, seed=3)
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 3, 2, 1]
    assert np.intersect1d(tr, val).size == 0 and np.union1d(tr, val).tolist() == list(range(110))
    again, other = split_validation(labels, 0.1, seed=3)[1], split_validation(labels, 0.1, seed=4)[1]
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    keep = np.arange(0, 110, 2)
    tr_k, val_k = split_validation(labels, 0.2, seed=0, within=keep)
    assert np.isin(val_k, keep).all() and np.union1d(tr_k, val_k).tolist() == keep.tolist()
    with pytest.raises(UsageError, match="holds out 0"):
        split_validation(labels[:5], 0.01, seed=0)


def test_keep_best_val_returns_the_best_validation_epoch_and_resumes_with_it(digits, tmp_path):
    train, test = digits
    tr_idx, val_idx = split_validation(train.labels, 0.25, seed=1)
    # bn_stats keep: the returned weights are exactly the best epoch's (test_batchnorm covers re-estimation);
    # fp32: this seed's history is the one described below (auto trains in bf16 on a CPU with native bf16)
    cfg = _cfg(epochs=5, lr=0.8, schedule="constant", val_fraction=0.25, keep_best="val", bn_stats="keep",
               precision="fp32")
    run = dict(device=CPU, test=test, selection=tr_idx, val_index=val_idx)
    ref = fit(Job(_model(train), train, **run), cfg, RunFiles(reporter=QUIET))
    val_acc = [h["val_acc"] for h in ref.history]
    assert ref.best_epoch == 1 + int(np.argmax(val_acc)) and ref.best_val == max(val_acc)
    assert ref.best_epoch < 5  # this seed's history peaks before the end, so last and best differ
    assert ref.test["top1"] == ref.history[ref.best_epoch - 1]["test_acc"]  # the returned weights are the best's
    assert ref.test_last["top1"] == ref.history[-1]["test_acc"]
    assert evaluate(ref.model, test, CPU)["top1"] == ref.test["top1"]
    path = tmp_path / "run.state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(Job(_model(train), train, **run), cfg, RunFiles(state=path, reporter=stop_after(5)))
    tensors, info = resume.load_state(path)
    assert np.array_equal(tensors["val_index"].numpy(), val_idx) and info["best_epoch"] is not None
    resumed = fit(Job(_model(train, seed=5), train, **run), cfg, RunFiles(state=path, resume=True, reporter=QUIET))
    assert resumed.best_epoch == ref.best_epoch and resumed.test == ref.test
    other = split_validation(train.labels, 0.25, seed=2)
    with pytest.raises(UsageError, match="another validation split"):
        fit(Job(_model(train), train, **{**run, "selection": other[0], "val_index": other[1]}), cfg, RunFiles(state=path, resume=True, reporter=QUIET))


def test_keep_best_val_needs_a_validation_split(cli, tmp_path):
    out = tmp_path / "t.safetensors"
    r = cli("train-teacher", "--keep-best", "val", "--out", out)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().splitlines()[-1].endswith("--keep-best val needs a validation split: add "
                                                      "--val-fraction F (e.g. 0.1)")


def test_cli_writes_the_best_validation_weights_of_its_log(cli, tmp_path):
    """train-teacher --val-fraction --keep-best val: --json's best_epoch is the log's best val_acc,
    and eval of the written file gives that epoch's test accuracy, not the last epoch's."""
    out, log = tmp_path / "t.safetensors", tmp_path / "t.jsonl"
    keep = tmp_path / "keep.csv"
    keep.write_text("index\n" + "".join(f"{i}\n" for i in range(400)))
    r = cli("train-teacher", "--keep", keep, "--epochs", "5", "--batch-size", "64", "--lr", "0.8", "--schedule",
            "constant", "--val-fraction", "0.2", "--keep-best", "val", "--seed", "2", "--bn-stats", "keep", "--out", out,
            "--log", log, "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc, lines = json.loads(r.stdout), [json.loads(x) for x in log.read_text().splitlines()]
    assert all("val_acc" in x for x in lines) and lines[0]["train_images"] == 320 // 64 * 64
    best = 1 + int(np.argmax([x["val_acc"] for x in lines]))
    meta = read_meta(out)["metrics"]
    metrics = json.loads(meta) if isinstance(meta, str) else meta
    assert doc["best_epoch"] == best == metrics["best_epoch"]
    assert metrics["test_top1"] == lines[best - 1]["test_acc"] and metrics["test_top1_last"] == lines[-1]["test_acc"]
    # the train loss and accuracy are those of the written (best) epoch too; the last epoch's are named so
    assert metrics["train_loss"] == lines[best - 1]["loss"] and metrics["train_acc"] == lines[best - 1]["train_acc"]
    assert metrics["train_loss_last"] == lines[-1]["loss"] and metrics["train_acc_last"] == lines[-1]["train_acc"]
    ev = cli("eval", "--model", out, "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["models"][0]["top1"] == pytest.approx(lines[best - 1]["test_acc"], abs=1e-12)


# ------------------------------------------------------------------------------ FINE features


def augmented_copy(images: np.ndarray, augment: str, seed: int) -> np.ndarray:
    """``images`` with ``augment`` applied, drawn from ``seed`` (what dynamic FINE's features see)."""
    return apply_draws(images, augment_draws(len(images), augment, seed))


def test_augmented_copy_is_a_seeded_pad_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    assert augmented_copy(images, "none", 0) is images
    a, b = augmented_copy(images, "crop-flip", 7), augmented_copy(images, "crop-flip", 7)
    assert np.array_equal(a, b) and not np.array_equal(a, augmented_copy(images, "crop-flip", 8))
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    for i in range(len(images)):  # each output is one crop of the padded image, flipped or not
        crops = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
        assert any(np.array_equal(a[i], c) or np.array_equal(a[i], c[:, ::-1]) for c in crops)
    flipped = augmented_copy(images, "flip", 1)
    assert all(np.array_equal(f, x) or np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images))


def test_augmented_features_in_chunks_equal_the_whole_set_at_once():
    """Large sets are augmented chunk by chunk (bounded memory): the draws are made for all rows
    first, so any chunking gives the copy of the whole set; rrc-flip contributes its flip only."""
    images = np.random.default_rng(1).integers(0, 256, size=(50, 6, 6, 3), dtype=np.uint8)
    whole = augmented_copy(images, "crop-flip", 5)
    d = augment_draws(len(images), "crop-flip", 5)
    for step in (1, 7, 50):
        parts = [apply_draws(images[lo:lo + step], d.rows(lo, lo + step)) for lo in range(0, 50, step)]
        assert np.array_equal(np.concatenate(parts), whole)
    rrc = augmented_copy(images, "rrc-flip", 5)
    assert augment_draws(50, "rrc-flip", 5).shifts is None
    assert all(np.array_equal(r, x) or np.array_equal(r, x[:, ::-1]) for r, x in zip(rrc, images))
    assert not np.array_equal(rrc, images)


def test_dynamic_fine_on_augmented_features_is_seeded_and_differs_from_plain(digits):
    train, test = digits
    train = replace(train, augment="crop-flip")
    runs = {ff: fit(Job(_model(train), train, CPU), _cfg(epochs=3, fine_warmup=2, fine_every=1, fine_features=ff), RunFiles(reporter=QUIET)) for ff in ("augmented", "plain")}
    again = fit(Job(_model(train), train, CPU), _cfg(epochs=3, fine_warmup=2, fine_every=1), RunFiles(reporter=QUIET))
    assert np.array_equal(again.selection, runs["augmented"].selection)  # the default, and deterministic
    assert not np.array_equal(runs["augmented"].selection, runs["plain"].selection)
