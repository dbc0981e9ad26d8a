"""The noise-robust label losses (GCE, SCE) against their formulas in float64, and the pure pieces
of F-DivideMix's step (sharpening, label refinement, mixup, the prior penalty, the ramp)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdfine.train.losses import LABEL_LOSSES, gce, label_loss, sce
from kdfine.train.strategies.dividemix import mixup, prior_penalty, ramp, refine, sharpen

B, K = 7, 5


def batch(seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(B, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    return z, y


def grad(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    fn(z).backward()
    return z.grad


@pytest.mark.parametrize("q", [0.1, 0.7, 1.0])
def test_gce_value_and_gradient_match_the_formula(q):
    z, y = batch(1)
    p = torch.softmax(z, 1)
    py = p[torch.arange(B), y]
    torch.testing.assert_close(gce(z, y, q), ((1 - py.pow(q)) / q).mean(), rtol=0, atol=1e-14)
    # d/dz_j (1 - p_y^q)/q = -p_y^q (onehot_j - p_j), per sample; the batch mean divides by B
    expected = -py.pow(q).view(-1, 1) * (F.one_hot(y, K).double() - p) / B
    torch.testing.assert_close(grad(lambda v: gce(v, y, q), z), expected, rtol=0, atol=1e-14)


def test_gce_tends_to_ce_as_q_goes_to_zero_and_is_mae_like_at_one():
    z, y = batch(2)
    ce = F.cross_entropy(z, y)
    errors = [abs(gce(z, y, q) - ce).item() for q in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors
    p = torch.softmax(z, 1)
    mae = (p - F.one_hot(y, K).double()).abs().sum(1).mean()  # = 2 (1 - p_y)
    torch.testing.assert_close(gce(z, y, 1.0), mae / 2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("a,b", [(0.1, 1.0), (1.0, 0.5)])
def test_sce_is_a_ce_plus_b_rce_with_log_zero_clamped_to_minus_four(a, b):
    z, y = batch(3)
    p = torch.softmax(z, 1)
    rce = 4.0 * (1 - p[torch.arange(B), y])  # -sum_k p_k log t_k with log 0 = -4, log 1 = 0
    torch.testing.assert_close(sce(z, y, a, b), a * F.cross_entropy(z, y) + b * rce.mean(), rtol=0, atol=1e-14)
    expected_grad = grad(lambda v: a * F.cross_entropy(v, y) + b * 4.0 * (1 - torch.softmax(v, 1)[torch.arange(B), y]).mean(), z)
    torch.testing.assert_close(grad(lambda v: sce(v, y, a, b), z), expected_grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("loss", LABEL_LOSSES)
def test_one_hot_soft_targets_give_the_label_loss(loss):
    z, y = batch(4)
    hard = label_loss(z, y, loss=loss)
    soft = label_loss(z, F.one_hot(y, K).double(), loss=loss)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-14)
    assert hard.dtype == torch.float64 and torch.isfinite(hard)


def test_soft_gce_weighs_each_class_by_its_target():
    z, _ = batch(5)
    t = torch.softmax(torch.randn(B, K, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 1)
    p = torch.softmax(z, 1)
    torch.testing.assert_close(gce(z, t, 0.5), (t * (1 - p.sqrt()) / 0.5).sum(1).mean(), rtol=0, atol=1e-14)


def test_unknown_label_loss_is_refused():
    z, y = batch(6)
    with pytest.raises(ValueError, match="ce, gce, sce"):
        label_loss(z, y, loss="mse")


def test_dividemix_pieces():
    z, y = batch(7)
    p = torch.softmax(z, 1)
    torch.testing.assert_close(sharpen(p, 1.0), p, rtol=0, atol=1e-15)
    s = sharpen(p, 0.5)
    torch.testing.assert_close(s, p.pow(2) / p.pow(2).sum(1, keepdim=True), rtol=0, atol=1e-15)
    assert (s.max(1).values >= p.max(1).values).all(), "sharpening raises the largest probability"
    torch.testing.assert_close(refine(p, y, torch.ones(B)), F.one_hot(y, K).double(), rtol=0, atol=0)
    torch.testing.assert_close(refine(p, y, torch.zeros(B)), p, rtol=0, atol=0)
    half = refine(p, y, torch.full((B,), 0.5))
    torch.testing.assert_close(half.sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-15)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    mx, mt = mixup(z, p, 0.7, perm)
    torch.testing.assert_close(mx, 0.7 * z + 0.3 * z[perm], rtol=0, atol=1e-15)
    torch.testing.assert_close(mt.sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-15)
    # the prior penalty is KL(uniform || mean prediction): zero for a uniform mean, positive otherwise
    assert prior_penalty(torch.zeros(B, K, dtype=torch.float64)).abs() < 1e-15
    mean = p.mean(0)
    torch.testing.assert_close(prior_penalty(z), (math.log(1.0 / K) - mean.log()).mean(),
                               rtol=0, atol=1e-14)
    assert prior_penalty(z) > 0
    assert [ramp(t, 10) for t in (5, 10, 18, 26, 40)] == [0.0, 0.0, 0.5, 1.0, 1.0]
