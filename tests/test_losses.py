"""The distillation losses against the theory of Kim et al. (IJCAI 2021), in float64, and the
decoupled (DKD, Zhao et al. 2022) and standardised (kl-std, Sun et al. 2024) losses against
independent numpy implementations of their formulas.

With d = z_s - z_t and K classes, the paper shows that the gradient of tau^2 * KL is
tau * (softmax(z_s/tau) - softmax(z_t/tau)): it tends to (1/K)(d - mean(d)) (logit matching) as
tau -> inf and, divided by tau, to onehot(argmax z_s) - onehot(argmax z_t) (label matching) as
tau -> 0. These tests pin each statement with a real tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_kdfine
from kdfine.errors import UsageError
from kdfine.models import checkpoint
from kdfine.options import TrainConfig, resume_keys
from kdfine.train.losses import LOSSES, dkd_warmup_factor, kd_loss, kl_inf_term, kl_term

B, K = 6, 10


def logits(seed: int, scale: float = 2.0, b: int = B, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, k, generator=g, dtype=torch.float64)


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    zs, zt = logits(seed), logits(seed + 100)
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed + 200))
    return zs, zt, y


def grad(loss: str, zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """d loss / d z_s, computed by autograd."""
    zs = zs.clone().requires_grad_(True)
    kd_loss(zs, zt, y, loss=loss, **kw).backward()
    return zs.grad


def centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(dim=1, keepdim=True)


def kl_grad_formula(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's closed form of the per-sample gradient of tau^2 * KL."""
    return tau * (torch.softmax(zs / tau, 1) - torch.softmax(zt / tau, 1))


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0, 20.0])
def test_kl_gradient_is_tau_times_softmax_difference(tau):
    zs, zt, y = pair(1)
    # the loss is a batch mean, so each row's gradient carries a factor 1/B
    g = grad("kl", zs, zt, y, tau=tau) * B
    torch.testing.assert_close(g, kl_grad_formula(zs, zt, tau), rtol=0, atol=1e-12)


def test_kl_gradient_tends_to_centred_logit_difference_at_rate_one_over_tau():
    zs, zt, y = pair(2)
    limit = centred(zs - zt) / K
    errors = []
    for tau in (10.0, 100.0, 1000.0):
        g = grad("kl", zs, zt, y, tau=tau) * B
        errors.append((g - limit).abs().max().item())
    assert errors[2] < 3e-3 * limit.abs().max().item()  # within 0.3% at tau = 1000
    for big, small in zip(errors, errors[1:]):
        assert 7.0 < big / small < 13.0, errors  # O(1/tau): ten times smaller per decade of tau


def test_kl_inf_gradient_is_the_large_tau_limit():
    zs, zt, y = pair(3)
    g = grad("kl-inf", zs, zt, y) * B
    torch.testing.assert_close(g, centred(zs - zt) / K, rtol=0, atol=1e-14)


def test_kl_inf_is_half_the_centred_squared_distance_over_k():
    zs, zt, y = pair(4)
    pd = centred(zs - zt)
    per_sample = (pd ** 2).sum(1) / (2 * K)
    torch.testing.assert_close(kl_inf_term(zs, zt), per_sample.mean(), rtol=1e-14, atol=0)


def test_tau_squared_kl_at_large_tau_equals_kl_inf():
    zs, zt, y = pair(5)
    tau = 1e4
    kl = kd_loss(zs, zt, y, loss="kl", tau=tau)
    kl_inf = kd_loss(zs, zt, y, loss="kl-inf")
    # kdfine.train.losses: kl-inf = (1/2K)||P d||^2 is the limit of tau^2 * KL itself ...
    torch.testing.assert_close(kl, kl_inf, rtol=1e-3, atol=0)
    # ... so twice tau^2 * KL is the centred squared logit distance over K, as the issue words it
    pd = centred(zs - zt)
    torch.testing.assert_close(2 * kl, ((pd ** 2).sum(1) / K).mean(), rtol=1e-3, atol=0)
    # and the approach is O(1/tau): much closer at 1e4 than at 10
    far = kd_loss(zs, zt, y, loss="kl", tau=10.0)
    assert abs(kl - kl_inf) < abs(far - kl_inf) / 100


def test_scaled_kl_gradient_tends_to_onehot_difference_as_tau_goes_to_zero():
    zs, zt, y = pair(6)
    zt[0] = zs[0] + 0.01 * logits(60, b=1)[0]  # a row whose argmax agrees: its limit is zero
    target = F.one_hot(zs.argmax(1), K).double() - F.one_hot(zt.argmax(1), K).double()
    assert (target.abs().sum(1) == 0).any() and (target.abs().sum(1) == 2).any()
    errors = []
    for tau in (1.0, 0.1, 0.01, 0.001):
        g = grad("kl", zs, zt, y, tau=tau) * B / tau
        errors.append((g - target).abs().max().item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 0.1  # at tau = 1 the soft targets are far from one-hot ...
    assert errors[-1] < 1e-9  # ... and at tau = 1e-3 they are one-hot


@pytest.mark.parametrize("loss,kw", [("kl", {"tau": 1.0}), ("kl", {"tau": 4.0}), ("kl", {"tau": 20.0}),
                                     ("kl-inf", {})])
def test_kl_ignores_a_constant_added_to_student_logits(loss, kw):
    zs, zt, y = pair(7)
    shift = torch.linspace(-3.0, 5.0, B, dtype=torch.float64).unsqueeze(1)  # one constant per sample
    base = kd_loss(zs, zt, y, loss=loss, **kw)
    torch.testing.assert_close(kd_loss(zs + shift, zt, y, loss=loss, **kw), base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd_loss(zs + 7.0, zt, y, loss=loss, **kw), base, rtol=1e-12, atol=1e-12)


def test_mse_sees_a_constant_added_to_student_logits():
    zs, zt, y = pair(8)
    c = 0.5
    base = kd_loss(zs, zt, y, loss="mse")
    shifted = kd_loss(zs + c, zt, y, loss="mse")
    # mean((d + c)^2) = mean(d^2) + 2c mean(d) + c^2
    expected = base + 2 * c * (zs - zt).mean() + c * c
    torch.testing.assert_close(shifted, expected, rtol=1e-12, atol=0)
    assert abs(shifted - base) > 0.1


def test_mse_value_and_gradient():
    zs, zt, y = pair(9)
    d = zs - zt
    torch.testing.assert_close(kd_loss(zs, zt, y, loss="mse"), (d ** 2).sum() / (B * K), rtol=1e-14, atol=0)
    torch.testing.assert_close(grad("mse", zs, zt, y), 2 * d / (B * K), rtol=0, atol=1e-15)


@pytest.mark.parametrize("loss,kw", [("kl", {"tau": 3.0}), ("mse", {}), ("kl-inf", {}),
                                     ("dkd", {"tau": 4.0, "dkd_alpha": 0.5, "dkd_beta": 3.0}),
                                     ("kl-std", {"tau": 2.0})])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.9])
def test_alpha_interpolates_with_cross_entropy(loss, kw, alpha):
    zs, zt, y = pair(10)
    pure = kd_loss(zs, zt, y, loss=loss, alpha=1.0, **kw)
    ce = F.cross_entropy(zs, y)
    mixed = kd_loss(zs, zt, y, loss=loss, alpha=alpha, **kw)
    torch.testing.assert_close(mixed, alpha * pure + (1 - alpha) * ce, rtol=1e-14, atol=1e-14)
    g_mixed = grad(loss, zs, zt, y, alpha=alpha, **kw)
    g_expected = alpha * grad(loss, zs, zt, y, alpha=1.0, **kw) + (1 - alpha) * grad("ce", zs, zt, y)
    torch.testing.assert_close(g_mixed, g_expected, rtol=1e-12, atol=1e-14)


def test_ce_ignores_the_teacher():
    zs, zt, y = pair(11)
    expected = F.cross_entropy(zs, y)
    torch.testing.assert_close(kd_loss(zs, zt, y, loss="ce"), expected, rtol=0, atol=0)
    torch.testing.assert_close(kd_loss(zs, None, y, loss="ce"), expected, rtol=0, atol=0)


def test_distillation_losses_need_a_teacher():
    zs, _, y = pair(12)
    for loss in ("kl", "mse", "kl-inf", "dkd", "kl-std"):
        with pytest.raises(UsageError, match="needs a teacher"):
            kd_loss(zs, None, y, loss=loss)


@pytest.mark.parametrize("loss", ["kl", "dkd", "kl-std"])
def test_low_precision_logits_are_scored_in_float32(loss):
    zs, zt, y = pair(13)
    zs[:, 0] += 60.0  # logits far apart: bf16's coarse steps and any large masking constant would show
    out = kd_loss(zs.bfloat16(), zt.bfloat16(), y, loss=loss, tau=4.0)
    assert out.dtype == torch.float32
    ref = kd_loss(zs.bfloat16().double(), zt.bfloat16().double(), y, loss=loss, tau=4.0)
    assert abs(out.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("loss,tau,alpha,fragment", [("l1", 4.0, 1.0, "--loss"), ("kl", float("nan"), 1.0, "--tau"), ("kl", 0.0, 1.0, "--tau"),
                                                     ("kl", -1.0, 1.0, "--tau"), ("mse", 4.0, 1.5, "--alpha"),
                                                     ("mse", 4.0, -0.1, "--alpha")])
def test_bad_options_are_usage_errors(loss, tau, alpha, fragment):
    with pytest.raises(UsageError, match=fragment):
        TrainConfig(loss=loss, tau=tau, alpha=alpha).validate()


@pytest.mark.parametrize("field,value,fragment", [("dkd_alpha", -1.0, "--dkd-alpha"), ("dkd_beta", float("inf"), "--dkd-beta"),
                                                  ("dkd_warmup", -1, "--dkd-warmup"), ("dkd_warmup", 2.5, "--dkd-warmup")])
def test_bad_dkd_options_are_usage_errors(field, value, fragment):
    with pytest.raises(UsageError, match=fragment):
        TrainConfig(loss="dkd", **{field: value}).validate("distill")


def test_dkd_options_belong_to_distill_and_a_resume_compares_them():
    with pytest.raises(UsageError, match="--dkd-beta is for distill"):
        TrainConfig(dkd_beta=2.0).validate("train-teacher")
    assert {"dkd_alpha", "dkd_beta", "dkd_warmup", "tau", "loss"} <= set(resume_keys())


def test_every_named_loss_is_accepted():
    zs, zt, y = pair(14)
    for loss in LOSSES:
        TrainConfig(loss=loss, tau=4.0, alpha=0.5).validate()
        assert torch.isfinite(kd_loss(zs, zt, y, loss=loss, tau=4.0, alpha=0.5))


def test_unknown_loss_name_is_a_programming_error():
    zs, zt, y = pair(15)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        kd_loss(zs, zt, y, loss="l1")


# ------------------------------------------------------------------ dkd and kl-std against numpy

def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """KL(p || q) of one distribution given by its logs (p = 0 entries contribute nothing)."""
    p = np.exp(log_p)
    return float(np.sum(np.where(p > 0, p * (log_p - log_q), 0.0)))


def np_dkd(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, tau: float, a: float, b: float) -> float:
    """The paper's definition, row by row: binary (target, rest) KL and the KL over the other classes."""
    total = 0.0
    for s_row, t_row, c in zip(zs / tau, zt / tau, y):
        ps, pt = np.exp(np_log_softmax(s_row)), np.exp(np_log_softmax(t_row))
        bs, bt = (np.array([p[c], np.delete(p, c).sum()]) for p in (ps, pt))  # (target, rest)
        tckd = np_kl(np.log(bt), np.log(bs))
        nckd = np_kl(np_log_softmax(np.delete(t_row, c)), np_log_softmax(np.delete(s_row, c)))
        total += tau * tau * (a * tckd + b * nckd)
    return total / len(y)


def np_kl_std(zs: np.ndarray, zt: np.ndarray, tau: float) -> float:
    def z_score(z):
        return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)

    ls, lt = np_log_softmax(z_score(zs) / tau), np_log_softmax(z_score(zt) / tau)
    return tau * tau * float(np.mean([np_kl(t, s) for s, t in zip(ls, lt)]))


@pytest.mark.parametrize("tau,a,b", [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (4.0, 0.3, 2.0), (20.0, 2.0, 0.5)])
def test_dkd_matches_the_formula(tau, a, b):
    zs, zt, y = pair(20)
    got = kd_loss(zs, zt, y, loss="dkd", tau=tau, alpha=1.0, dkd_alpha=a, dkd_beta=b)
    expected = np_dkd(zs.numpy(), zt.numpy(), y.numpy(), tau, a, b)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0, 10.0])
def test_kl_std_matches_the_formula(tau):
    zs, zt, y = pair(21)
    zs = 5.0 * zs + 3.0  # another range and offset than the teacher's: standardisation removes both
    got = kd_loss(zs, zt, y, loss="kl-std", tau=tau, alpha=1.0)
    assert got.item() == pytest.approx(np_kl_std(zs.numpy(), zt.numpy(), tau), rel=1e-12)


def test_kl_std_ignores_the_scale_and_offset_of_either_logit_vector():
    zs, zt, y = pair(22)
    base = kd_loss(zs, zt, y, loss="kl-std", tau=2.0)
    scale = torch.linspace(0.5, 4.0, B, dtype=torch.float64).unsqueeze(1)  # one per sample
    moved = kd_loss(scale * zs - 2.0, 3.0 * zt + scale, y, loss="kl-std", tau=2.0)
    # equal up to the 1e-7 added to the std, relative to stds of order 2 to 8
    torch.testing.assert_close(moved, base, rtol=1e-6, atol=0)
    assert abs(kd_loss(scale * zs, zt, y, loss="kl", tau=2.0) - kd_loss(zs, zt, y, loss="kl", tau=2.0)) > 0.1


def test_dkd_at_unit_weights_recombines_into_kl_as_the_paper_decomposes_it():
    # Zhao et al., eq. 5: KL = TCKD + (1 - p_t^T) * NCKD, per sample, with p^T the teacher's target probability
    zs, zt, y = pair(23)
    tau = 3.0
    per = [kd_loss(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], loss="dkd", tau=tau, dkd_alpha=1.0, dkd_beta=0.0)
           for i in range(B)]
    nckd = [kd_loss(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], loss="dkd", tau=tau, dkd_alpha=0.0, dkd_beta=1.0)
            for i in range(B)]
    pt = torch.softmax(zt / tau, 1).gather(1, y.unsqueeze(1)).squeeze(1)
    recombined = torch.stack([t + (1 - p) * n for t, p, n in zip(per, pt, nckd)]).mean()
    torch.testing.assert_close(recombined, kl_term(zs, zt, tau), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss,kw", [("dkd", {"tau": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}),
                                     ("dkd", {"tau": 1.5, "dkd_alpha": 0.7, "dkd_beta": 2.0}),
                                     ("kl-std", {"tau": 2.0}), ("kl-std", {"tau": 4.0})])
def test_gradients_match_finite_differences(loss, kw):
    zs, zt, y = pair(24)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, zt, y, loss=loss, **kw),
                                    (zs.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dkd_with_two_classes_is_its_tckd_weight_times_kl():
    # K = 2: one non-target class, so NCKD is 0 and TCKD is the whole KL
    zs, zt = logits(25, k=2), logits(26, k=2)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    for b in (0.0, 8.0):
        got = kd_loss(zs, zt, y, loss="dkd", tau=4.0, dkd_alpha=0.6, dkd_beta=b)
        torch.testing.assert_close(got, 0.6 * kl_term(zs, zt, 4.0), rtol=1e-12, atol=0)
        assert got.item() == pytest.approx(np_dkd(zs.numpy(), zt.numpy(), y.numpy(), 4.0, 0.6, b), rel=1e-12)


def test_kl_std_with_two_classes_matches_the_formula():
    zs, zt = logits(27, k=2), logits(28, k=2)
    got = kd_loss(zs, zt, torch.zeros(B, dtype=torch.long), loss="kl-std", tau=2.0)
    assert got.item() == pytest.approx(np_kl_std(zs.numpy(), zt.numpy(), 2.0), rel=1e-12)


def test_dkd_with_a_one_hot_teacher_is_finite_and_ignores_its_target_margin():
    zs, zt, y = pair(29)
    ref = kd_loss(zs, zt, y, loss="dkd", tau=1.0, dkd_alpha=0.0, dkd_beta=1.0)
    hot = zt.clone()
    hot[torch.arange(B), y] += 1e4  # p_target = 1 to the last bit, even at tau = 1
    g = zs.clone().requires_grad_(True)
    nckd = kd_loss(g, hot, y, loss="dkd", tau=1.0, dkd_alpha=0.0, dkd_beta=1.0)
    nckd.backward()
    # the target is removed before the softmax: NCKD does not see the target logit at all
    torch.testing.assert_close(nckd, ref, rtol=1e-12, atol=0)
    assert torch.isfinite(g.grad).all()
    # TCKD against a teacher whose target probability is 1: -log p_target of the student
    tckd = kd_loss(zs, hot, y, loss="dkd", tau=1.0, dkd_alpha=1.0, dkd_beta=0.0)
    expected = -F.log_softmax(zs, 1).gather(1, y.unsqueeze(1)).mean()
    torch.testing.assert_close(tckd, expected, rtol=1e-12, atol=0)


def test_one_hot_like_teacher_matches_the_formulas():
    zs, zt, y = pair(30)
    zt = 40.0 * F.one_hot(y, K).double() + 0.1 * zt  # p_target = 1 - O(1e-17) at tau = 1
    for tau in (1.0, 4.0):
        got = kd_loss(zs, zt, y, loss="dkd", tau=tau)
        assert got.item() == pytest.approx(np_dkd(zs.numpy(), zt.numpy(), y.numpy(), tau, 1.0, 8.0), rel=1e-9)
        got = kd_loss(zs, zt, y, loss="kl-std", tau=tau)
        assert got.item() == pytest.approx(np_kl_std(zs.numpy(), zt.numpy(), tau), rel=1e-12)


@pytest.mark.parametrize("loss,kw", [("dkd", {"tau": 4.0}), ("kl-std", {"tau": 2.0})])
def test_equal_logits(loss, kw):
    zs, zt, y = pair(31)
    flat = torch.full_like(zs, 0.7)
    # student equal to teacher: zero loss and zero gradient, also when both are flat
    for t in (zt, flat):
        g = t.clone().requires_grad_(True)
        out = kd_loss(g, t, y, loss=loss, **kw)
        out.backward()
        assert abs(out.item()) < 1e-12 and g.grad.abs().max() < 1e-9
    # a flat student (all classes equal): finite value and gradient (kl-std: Z = 0, torch's std
    # alone would give NaN there), and the value of the formula
    g = flat.clone().requires_grad_(True)
    out = kd_loss(g, zt, y, loss=loss, **kw)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(g.grad).all()
    expected = (np_dkd(flat.numpy(), zt.numpy(), y.numpy(), 4.0, 1.0, 8.0) if loss == "dkd"
                else np_kl_std(flat.numpy(), zt.numpy(), 2.0))
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_dkd_warmup_factor_is_linear_in_the_one_based_epoch():
    assert [dkd_warmup_factor(e, 20) for e in (1, 10, 19, 20, 21, 240)] == pytest.approx(
        [0.05, 0.5, 0.95, 1.0, 1.0, 1.0], abs=1e-15)
    assert dkd_warmup_factor(3, 0) == dkd_warmup_factor(None, 20) == 1.0
    assert max(dkd_warmup_factor(e, 20) for e in range(1, 11)) == 0.5  # 10 epochs never reach full weight


def test_dkd_warmup_scales_the_distillation_term_only():
    zs, zt, y = pair(32)
    full = kd_loss(zs, zt, y, loss="dkd", tau=4.0)
    assert kd_loss(zs, zt, y, loss="dkd", tau=4.0, dkd_warmup=20, epoch=5) == pytest.approx(0.25 * full.item())
    mixed = kd_loss(zs, zt, y, loss="dkd", tau=4.0, alpha=0.5, dkd_warmup=20, epoch=5)
    assert mixed.item() == pytest.approx(0.5 * 0.25 * full.item() + 0.5 * F.cross_entropy(zs, y).item(), rel=1e-12)
    # the warm-up is dkd's: kl-std and kl ignore it
    assert kd_loss(zs, zt, y, loss="kl-std", dkd_warmup=20, epoch=1) == kd_loss(zs, zt, y, loss="kl-std")


# ------------------------------------------------------------------ the command line

def _epoch_losses(log) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_cli_distill_dkd_records_its_options_and_warms_up_per_epoch(digits_teacher, tmp_path):
    out, log = tmp_path / "dkd.safetensors", tmp_path / "dkd.jsonl"
    # one batch of the whole training set and a learning rate too small to move the weights:
    # each epoch's loss is the same dkd term times that epoch's warm-up factor, 1/4 then 2/4
    r = run_kdfine("distill", "--teacher", digits_teacher, "--arch", "mlp-32", "--loss", "dkd", "--tau", "2",
                   "--dkd-alpha", "0.5", "--dkd-beta", "4", "--dkd-warmup", "4", "--epochs", "2", "--lr", "1e-9",
                   "--batch-size", "4096", "--log", log, "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    meta = checkpoint.read_meta(out)
    assert (meta["loss"], meta["tau"], meta["alpha"]) == ("dkd", 2.0, 1.0)
    assert {k: meta["config"][k] for k in ("dkd_alpha", "dkd_beta", "dkd_warmup")} == {
        "dkd_alpha": 0.5, "dkd_beta": 4.0, "dkd_warmup": 4}
    first, second = _epoch_losses(log)
    assert second / first == pytest.approx(2.0, rel=1e-4)
    r = run_kdfine("info", out)
    assert r.returncode == 0, r.stderr
    assert "loss dkd (tau 2.0, alpha 1.0, dkd-alpha 0.5, dkd-beta 4.0, dkd-warmup 4)" in r.stdout


def test_cli_distill_kl_std_records_its_loss(digits_teacher, tmp_path):
    out = tmp_path / "std.safetensors"
    r = run_kdfine("distill", "--teacher", digits_teacher, "--arch", "mlp-32", "--loss", "kl-std", "--tau", "2",
                   "--alpha", "0.9", "--epochs", "1", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    meta = checkpoint.read_meta(out)
    assert (meta["loss"], meta["tau"], meta["alpha"]) == ("kl-std", 2.0, 0.9)
    assert meta["config"]["loss"] == "kl-std" and 0.0 <= meta["metrics"]["test_top1"] <= 1.0
    r = run_kdfine("info", out)
    assert r.returncode == 0 and "loss kl-std (tau 2.0, alpha 0.9)" in r.stdout, r.stdout + r.stderr
