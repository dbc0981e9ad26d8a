"""The distillation losses against the theory of Kim et al. (IJCAI 2021), in float64.

With d = z_s - z_t and K classes, the paper shows that the gradient of tau^2 * KL is
tau * (softmax(z_s/tau) - softmax(z_t/tau)): it tends to (1/K)(d - mean(d)) (logit matching) as
tau -> inf and, divided by tau, to onehot(argmax z_s) - onehot(argmax z_t) (label matching) as
tau -> 0. These tests pin each statement with a real tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdfine.errors import UsageError
from kdfine.losses import LOSSES, kd_loss, kl_inf_term
from kdfine.options import TrainConfig

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
    # kdfine.losses: kl-inf = (1/2K)||P d||^2 is the limit of tau^2 * KL itself ...
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


@pytest.mark.parametrize("loss,kw", [("kl", {"tau": 3.0}), ("mse", {}), ("kl-inf", {})])
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
    for loss in ("kl", "mse", "kl-inf"):
        with pytest.raises(UsageError, match="needs a teacher"):
            kd_loss(zs, None, y, loss=loss)


def test_low_precision_logits_are_scored_in_float32():
    zs, zt, y = pair(13)
    out = kd_loss(zs.bfloat16(), zt.bfloat16(), y, loss="kl", tau=4.0)
    assert out.dtype == torch.float32
    ref = kd_loss(zs.bfloat16().double(), zt.bfloat16().double(), y, loss="kl", tau=4.0)
    assert abs(out.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("loss,tau,alpha,fragment", [("l1", 4.0, 1.0, "--loss"), ("kl", float("nan"), 1.0, "--tau"), ("kl", 0.0, 1.0, "--tau"),
                                                     ("kl", -1.0, 1.0, "--tau"), ("mse", 4.0, 1.5, "--alpha"),
                                                     ("mse", 4.0, -0.1, "--alpha")])
def test_bad_options_are_usage_errors(loss, tau, alpha, fragment):
    with pytest.raises(UsageError, match=fragment):
        TrainConfig(loss=loss, tau=tau, alpha=alpha).validate()


def test_every_named_loss_is_accepted():
    zs, zt, y = pair(14)
    for loss in LOSSES:
        TrainConfig(loss=loss, tau=4.0, alpha=0.5).validate()
        assert torch.isfinite(kd_loss(zs, zt, y, loss=loss, tau=4.0, alpha=0.5))


def test_unknown_loss_name_is_a_programming_error():
    zs, zt, y = pair(15)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        kd_loss(zs, zt, y, loss="l1")
