"""BatchNorm running statistics at the end of a run (``--bn-stats``, kdfine.train.batchnorm): the lag
measure, the re-estimation itself, the default student that evaluated at chance (torchvision's
MobileNetV3, momentum 0.01, after a short run), and the runs that must not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import digits_slice, stop_after, tiny_cnn, write_png_tree
from kdfine.models.base import Classifier
from kdfine.options import TrainConfig
from kdfine.train import batchnorm
from kdfine.train.loop import Job, RunFiles, fit
from kdfine.train.progress import Reporter
from kdfine.train.run import near_chance

CPU = torch.device("cpu")
QUIET = Reporter(quiet=True)


def test_recent_share_is_the_weight_of_the_last_tenth_of_the_steps():
    assert batchnorm.recent_share(0.1, 100) == pytest.approx(1 - 0.9 ** 10)
    assert batchnorm.recent_share(0.01, 270) == pytest.approx(1 - 0.99 ** 27)
    assert batchnorm.recent_share(None, 50) == pytest.approx(5 / 50)  # a cumulative average
    assert batchnorm.recent_share(0.1, 3) == pytest.approx(0.1)  # at least one step
    assert batchnorm.recent_share(0.5, 0) == 1.0


def _bn_net(momentum: float | None) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU())


def _steps(model: nn.Module, n: int) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(n):
            model(torch.randn(4, 3, 5, 5))


def test_lag_counts_the_steps_of_this_run_only():
    slow, fast = _bn_net(0.01), _bn_net(0.1)
    start_slow, start_fast = batchnorm.tracked(slow), batchnorm.tracked(fast)
    assert batchnorm.lag(slow, start_slow) is None  # nothing trained yet
    _steps(slow, 100)
    _steps(fast, 100)
    lag = batchnorm.lag(slow, start_slow)
    assert lag.names == ("1",) and lag.steps == 100 and lag.lagging
    assert not batchnorm.lag(fast, start_fast).lagging
    # weights that arrived with 100 tracked batches (a pretrained file): only the run's steps count
    assert batchnorm.lag(fast, batchnorm.tracked(fast)) is None
    _steps(fast, 5)
    assert batchnorm.lag(fast, {"1": 100}).steps == 5 and batchnorm.lag(fast, {"1": 100}).lagging


def test_recompute_is_the_average_of_the_batch_statistics_and_restores_the_layer():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.01)
    model = nn.Sequential(bn, nn.Dropout(0.5))
    model.eval()
    bn.num_batches_tracked.fill_(7)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    index = batchnorm.sample(np.arange(40), 2048, seed=3)
    assert sorted(index.tolist()) == list(range(40)) and index.tolist() != list(range(40))
    used = batchnorm.recompute(model, ["0"], images, index, (0.5,) * 3, (0.25,) * 3, device=CPU, batch_size=8)
    assert used == 40
    x = (images[index].astype(np.float64) / 255 - 0.5) / 0.25  # (N, H, W, C), normalised
    batches = x.reshape(5, 8 * 36, 3)
    assert np.allclose(bn.running_mean.numpy(), batches.mean(1).mean(0), atol=1e-5)
    assert np.allclose(bn.running_var.numpy(), batches.var(1, ddof=1).mean(0), atol=1e-4)
    assert bn.momentum == 0.01 and int(bn.num_batches_tracked) == 7
    assert not model.training and not bn.training


def test_default_student_at_64px_leaves_chance_after_the_reestimation(tmp_path, capsys):
    """tv:mobilenet_v3_small (BatchNorm momentum 0.01) after 18 steps at 64 px: its running
    statistics make it predict one class for every image; re-estimated, it classifies."""
    from kdfine import api
    from kdfine.options import DataOptions

    root = write_png_tree(tmp_path / "photos", classes=("red", "green", "blue"), per_class=16, size=64)
    out = tmp_path / "s.safetensors"
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, seed=0)
    r = api.train_teacher(str(out), arch="tv:mobilenet_v3_small", data=DataOptions(f"imagefolder:{root}"), cfg=cfg,
                          device="cpu")
    m = r["metrics"]
    assert m["test_top1_running_stats"] <= 1 / 3 + 0.05, m  # chance: one class for all
    assert m["test_top1"] >= m["test_top1_running_stats"] + 0.3, m
    assert m["bn_recomputed_images"] == 48 and r["batchnorm"]["momentum"] == 0.01
    assert r["epochs"][-1]["test_acc"] == m["test_top1_running_stats"]  # the log shows the running statistics
    assert "BatchNorm statistics re-estimated on 48 training images" in capsys.readouterr().err
    ev = api.evaluate([str(out)], device="cpu", quiet=True)  # the file holds the re-estimated statistics
    assert ev["models"][0]["top1"] == pytest.approx(m["test_top1"])


class _NoNorm(Classifier):
    def __init__(self, train):
        super().__init__()
        d = train.in_channels * train.image_size ** 2
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU())
        self.feature_dim = 16
        self.head = nn.Linear(16, train.num_classes)

    def features(self, x):
        return self.body(x)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_network_without_batchnorm_is_left_alone():
    train, test = digits_slice(128, 50)
    cfg = TrainConfig(epochs=1, batch_size=32, seed=0)
    runs = []
    for mode in ("keep", "recompute"):
        torch.manual_seed(0)
        runs.append(fit(Job(_NoNorm(train), train, CPU, test=test), TrainConfig(**{**cfg.__dict__, "bn_stats": mode}),
                        RunFiles(reporter=QUIET)))
    assert runs[1].batchnorm is None and runs[0].test == runs[1].test
    a, b = _weights(runs[0].model), _weights(runs[1].model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_leaves_the_running_statistics_and_both_coteaching_networks_are_reestimated():
    train, test = digits_slice(256, 50)
    cfg = dict(epochs=2, batch_size=64, seed=1, fine_warmup=1, fine_every=1, fine_strategy="coteach")
    nets = []

    def make(seed):
        nets.append(tiny_cnn(train, seed))
        return nets[-1]

    kept = fit(Job(tiny_cnn(train), train, CPU, test=test, make_model=make), TrainConfig(**cfg, bn_stats="keep"),
               RunFiles(reporter=QUIET))
    assert kept.batchnorm is None and kept.test["top1"] == kept.history[-1]["test_acc"]
    model = tiny_cnn(train)
    r = fit(Job(model, train, CPU, test=test, make_model=make), TrainConfig(**cfg, bn_stats="recompute"),
            RunFiles(reporter=QUIET))
    assert r.batchnorm["images"] == 256 and "top1_net2" in r.test and "top1_ensemble" in r.test
    index = batchnorm.sample(np.arange(256), batchnorm.BN_IMAGES, 1)
    for net in (model, nets[-1]):  # re-estimating again changes nothing: both were re-estimated
        before = _weights(net)
        batchnorm.recompute(net, list(batchnorm.bn_layers(net)), train.images, index, train.mean, train.std,
                            device=CPU, batch_size=64)
        after = _weights(net)
        assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-6) for k in before)


def test_resumed_run_decides_and_reestimates_like_an_uninterrupted_one(tmp_path):
    """The weights arrive with 1000 tracked batches (as from a pretrained file); the 12 steps of
    this run decide (auto), also after a resume, whose state records the count at the start."""
    train, _ = digits_slice(256)
    cfg = TrainConfig(epochs=3, batch_size=64, seed=1)

    def model(seed=0):
        m = tiny_cnn(train, seed)
        for layer in batchnorm.bn_layers(m).values():
            layer.num_batches_tracked.fill_(1000)
        return m

    ref = fit(Job(model(), train, CPU), cfg, RunFiles(reporter=QUIET))
    assert ref.batchnorm is not None and ref.batchnorm["steps"] == 12
    path = tmp_path / "run.state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(Job(model(), train, CPU), cfg, RunFiles(state=path, reporter=stop_after(3)))
    resumed = fit(Job(model(99), train, CPU), cfg, RunFiles(state=path, resume=True, reporter=QUIET))
    assert resumed.batchnorm == ref.batchnorm
    a, b = _weights(ref.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_near_chance_flags_a_network_that_fits_its_batches_but_guesses():
    assert near_chance(0.35, 0.10, 10) and near_chance(0.9, 0.34, 3)
    assert not near_chance(0.35, 0.30, 10)  # learned something
    assert not near_chance(0.20, 0.10, 10)  # never fitted the training set either
    assert not near_chance(0.99, 0.60, 2)
