"""Distillation losses (Kim et al., IJCAI 2021), as pure functions of logits.

With z_s student logits, z_t teacher logits (B, K), y labels (B,), d = z_s - z_t:

- ``ce``:     CE(z_s, y); the teacher is ignored.
- ``kl``:     alpha * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau)) + (1 - alpha) * CE(z_s, y).
              Its gradient w.r.t. z_s is tau * (softmax(z_s/tau) - softmax(z_t/tau)): label matching
              as tau -> 0, logit matching (1/K)(d - mean(d)) as tau -> inf.
- ``mse``:    alpha * mean over B*K of d^2 + (1 - alpha) * CE(z_s, y)   (logit matching).
- ``kl-inf``: alpha * mean over B of (1/2K) * ||d - mean(d)||^2 + (1 - alpha) * CE(z_s, y), the
              tau -> inf limit of tau^2 * KL.

KL terms are the batch mean of the per-sample sum over classes. Computation is in float32 (or
float64 when given float64), whatever autocast produced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfine.errors import UsageError
from kdfine.options import LOSSES  # the names the CLI offers (option values are validated there)

__all__ = ["LOSSES", "kd_loss", "kl_term", "mse_term", "kl_inf_term"]


def kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau)), batch mean of the per-sample sum."""
    log_ps = F.log_softmax(student_logits / tau, dim=1)
    log_pt = F.log_softmax(teacher_logits / tau, dim=1)
    return tau * tau * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def mse_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over B*K of (z_s - z_t)^2."""
    return F.mse_loss(student_logits, teacher_logits)


def kl_inf_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of (1/2K) * ||P(z_s - z_t)||^2, P the centring projection."""
    d = student_logits - teacher_logits
    d = d - d.mean(dim=1, keepdim=True)
    return d.pow(2).sum(dim=1).mean() / (2 * d.shape[1])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
            loss: str = "kl", tau: float = 4.0, alpha: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """The scalar training loss of one batch (see the module docstring).

    student_logits, teacher_logits: (B, K); labels: (B,) int64 (only read when CE contributes);
    label_smoothing: of the CE terms (``--label-smoothing``, torch's definition), default 0.
    """
    zs = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    if loss == "ce" or teacher_logits is None:
        if loss != "ce":
            raise UsageError(f"--loss {loss} needs a teacher")
        return F.cross_entropy(zs, labels, label_smoothing=label_smoothing)
    zt = teacher_logits.to(zs.dtype)
    if loss == "kl":
        kd = kl_term(zs, zt, tau)
    elif loss == "mse":
        kd = mse_term(zs, zt)
    elif loss == "kl-inf":
        kd = kl_inf_term(zs, zt)
    else:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if alpha >= 1.0:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(zs, labels, label_smoothing=label_smoothing)
