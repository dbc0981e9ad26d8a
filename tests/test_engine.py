"""The training loop in-process (kdfine.train.loop.fit on a slice of digits, tiny cnn), the resume state
(kdfine.train.resume) and the signal handling (kdfine.runtime.signals): a failure here names the function."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import digits_slice, stop_after, tiny_cnn
from kdfine.train import resume
from kdfine.models.checkpoint import state_tensors
from kdfine.data.noise import apply_noise
from kdfine.options import TrainConfig
from kdfine.train.loop import Job, RunFiles, fit
from kdfine.errors import InputError, UsageError
from kdfine.train.progress import Reporter
from kdfine.runtime.signals import StopFlag, sigterm_as_interrupt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return digits_slice(256)


_model = tiny_cnn


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "seed": 1, "fine_warmup": 1, **kw})


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = state_tensors(a), state_tensors(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_records_every_epoch_and_repeats_with_the_same_seed(digits):
    train, test = digits
    quiet = Reporter(quiet=True)
    cfg = _cfg(bn_stats="keep")  # the final metrics are the last epoch's (see test_batchnorm for re-estimation)
    r1 = fit(Job(_model(train), train, CPU, test=test), cfg, RunFiles(reporter=quiet))
    r2 = fit(Job(_model(train), train, CPU, test=test), cfg, RunFiles(reporter=quiet))
    assert [h["epoch"] for h in r1.history] == [1, 2]
    assert r1.history[0]["lr"] == pytest.approx(0.1) and r1.history[1]["lr"] == pytest.approx(0.01)
    assert r1.history[0]["train_images"] == 4 * 64  # 256 // 64 full batches
    assert r1.test["top1"] == r1.history[-1]["test_acc"] and 0.0 <= r1.test["top1"] <= 1.0
    assert r1.selection is None
    assert _weights_equal(r1.model, r2.model)


def test_dynamic_fine_selection_trains_on_a_subset_of_the_keep_list(digits):
    train, test = digits
    truth = train.labels
    noisy = train.with_labels(apply_noise(truth, "sym:0.4", train.num_classes, seed=0))
    keep = np.arange(0, 256, 2)[::-1]  # unsorted on purpose: fit sorts it
    r = fit(Job(_model(train), noisy, CPU, test=test, selection=keep, truth=truth), _cfg(fine_every=1), RunFiles(reporter=Reporter(quiet=True)))
    assert "fine_kept" not in r.history[0]  # warm-up epoch
    rec = r.history[1]
    assert rec["fine_total"] == 128 and 2 <= rec["fine_kept"] <= 128
    assert 0.0 <= rec["fine_precision"] <= 1.0
    assert r.selection.size == rec["fine_kept"]
    assert np.all(np.diff(r.selection) > 0) and np.isin(r.selection, keep).all()




def test_resumed_fit_ends_with_the_weights_of_an_uninterrupted_one(digits, tmp_path):
    train, _ = digits
    cfg = _cfg(epochs=3, fine_every=1)
    ref = fit(Job(_model(train), train, CPU), cfg, RunFiles(reporter=Reporter(quiet=True)))
    path = tmp_path / "run.state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(Job(_model(train), train, CPU), cfg, RunFiles(state=path, reporter=stop_after(3)))
    assert resume.load_state(path)[1]["epoch"] == 2
    resumed = fit(Job(_model(train, seed=99), train, CPU), cfg, RunFiles(state=path, resume=True, reporter=Reporter(quiet=True)))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert _weights_equal(ref.model, resumed.model)
    assert np.array_equal(ref.selection, resumed.selection)
    with pytest.raises(UsageError, match="other options"):
        fit(Job(_model(train), train, CPU), replace(cfg, lr=0.05), RunFiles(state=path, resume=True, record={"lr": 0.05}, reporter=Reporter(quiet=True)))


def _trained_sgd() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
    return model, opt


def test_state_round_trip_restores_the_optimizer_state_dict(tmp_path):
    model, opt = _trained_sgd()
    path = tmp_path / "s.safetensors"
    resume.save_state(path, [model], [opt], {"extra": torch.arange(3)}, {"epoch": 4})
    tensors, info = resume.load_state(path)
    assert info["epoch"] == 4 and torch.equal(tensors["extra"], torch.arange(3))
    fresh = _trained_sgd()[0]
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    resume.restore(path, tensors, info, [fresh], [fresh_opt])
    assert _weights_equal(model, fresh)
    saved, now = opt.state_dict(), fresh_opt.state_dict()
    assert saved["state"].keys() == now["state"].keys()
    for pid, entries in saved["state"].items():
        assert torch.equal(entries["momentum_buffer"], now["state"][pid]["momentum_buffer"])
    assert fresh_opt.param_groups[0]["lr"] == 0.5  # the run's options stay (--force)


def test_state_that_does_not_fit_or_is_old_is_refused(tmp_path):
    model, opt = _trained_sgd()
    path = tmp_path / "s.safetensors"
    resume.save_state(path, [model], [opt], {}, {"epoch": 1})
    tensors, info = resume.load_state(path)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    with pytest.raises(InputError, match="does not fit this model"):
        resume.restore(path, tensors, info, [other], [torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)])
    key = next(k for k in tensors if k.startswith("optim0."))
    tensors[key] = torch.zeros(7)
    with pytest.raises(InputError, match="does not fit this model.*shape"):
        resume.restore(path, tensors, info, [model], [opt])
    old = tmp_path / "old.safetensors"  # the format before optimizer.state_dict(): optim.{group}.{param}
    save_file({"optim.0.0": torch.zeros(4, 3)}, str(old), metadata={"kdfine_state": '{"epoch": 1}'})
    with pytest.raises(InputError, match="unreadable.*delete it"):
        resume.load_state(old)


def test_stop_flag_catches_sigint_and_puts_the_handler_back():
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        assert not stop.should_stop(0)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.should_stop(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_becomes_keyboard_interrupt_until_restored():
    before = signal.getsignal(signal.SIGTERM)
    restore = sigterm_as_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before
