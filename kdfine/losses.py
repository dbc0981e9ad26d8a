"""Distillation losses (Kim et al., IJCAI 2021) and noise-robust label losses, as pure functions
of logits.

With z_s student logits, z_t teacher logits (B, K), y labels (B,), d = z_s - z_t:

- ``ce``:     CE(z_s, y); the teacher is ignored.
- ``kl``:     alpha * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau)) + (1 - alpha) * CE(z_s, y).
              Its gradient w.r.t. z_s is tau * (softmax(z_s/tau) - softmax(z_t/tau)): label matching
              as tau -> 0, logit matching (1/K)(d - mean(d)) as tau -> inf.
- ``mse``:    alpha * mean over B*K of d^2 + (1 - alpha) * CE(z_s, y)   (logit matching).
- ``kl-inf``: alpha * mean over B of (1/2K) * ||d - mean(d)||^2 + (1 - alpha) * CE(z_s, y), the
              tau -> inf limit of tau^2 * KL.

Label losses for ``train-teacher --loss`` (p = softmax(z), t the target: one-hot labels (B,) or
soft targets (B, K), which DivideMix's mixed-up targets need; one-hot reduces to the usual form):

- ``ce``:  -sum_k t_k log p_k.
- ``gce``: sum_k t_k (1 - p_k^q) / q, generalized cross-entropy (Zhang & Sabuncu, 2018), q = 0.7;
           CE as q -> 0, 1 - p_y (MAE up to a factor 2) at q = 1.
- ``sce``: a * CE + b * RCE, RCE = -sum_k p_k log t_k with log 0 clamped to -4 (Wang et al., 2019),
           a = 0.1, b = 1.0.

KL terms are the batch mean of the per-sample sum over classes. Computation is in float32 (or
float64 when given float64), whatever autocast produced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfine.errors import UsageError
from kdfine.options import LABEL_LOSSES, LOSSES  # the names the CLI offers (values are validated there)

__all__ = ["LOSSES", "LABEL_LOSSES", "kd_loss", "kl_term", "mse_term", "kl_inf_term", "gce", "sce", "label_loss"]

LOG_ZERO = -4.0  # SCE's clamp of log 0 in the reverse cross-entropy (Wang et al., 2019)


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


def _targets(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) targets: one-hot of int labels (B,), or soft targets (B, K) as given."""
    if labels.ndim == 2:
        return labels.to(dtype)
    return F.one_hot(labels, k).to(dtype)


def gce(logits: torch.Tensor, labels: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Generalized cross-entropy, batch mean of sum_k t_k (1 - p_k^q) / q; q in (0, 1].

    logits: (B, K); labels: (B,) int64 or soft targets (B, K)."""
    p = torch.softmax(logits, dim=1)
    t = _targets(labels, logits.shape[1], p.dtype)
    return (t * (1.0 - p.clamp_min(torch.finfo(p.dtype).tiny).pow(q)) / q).sum(1).mean()


def sce(logits: torch.Tensor, labels: torch.Tensor, a: float = 0.1, b: float = 1.0) -> torch.Tensor:
    """Symmetric cross-entropy, batch mean of a * CE + b * RCE, RCE = -sum_k p_k max(log t_k, -4).

    logits: (B, K); labels: (B,) int64 or soft targets (B, K)."""
    log_p = F.log_softmax(logits, dim=1)
    t = _targets(labels, logits.shape[1], log_p.dtype)
    ce = -(t * log_p).sum(1)
    log_t = torch.where(t > 0, t.clamp_min(torch.finfo(t.dtype).tiny).log(), torch.full_like(t, LOG_ZERO))
    rce = -(log_p.exp() * log_t.clamp_min(LOG_ZERO)).sum(1)
    return (a * ce + b * rce).mean()


def label_loss(logits: torch.Tensor, labels: torch.Tensor, *, loss: str = "ce", gce_q: float = 0.7,
               sce_alpha: float = 0.1, sce_beta: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss on labels alone (``train-teacher --loss ce|gce|sce``), in float32 (or
    float64 when given float64). logits: (B, K); labels: (B,) int64 or soft targets (B, K);
    ``label_smoothing`` applies to CE on integer labels (soft targets are already soft)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    if loss == "ce":
        if labels.ndim == 2:
            return -(labels.to(z.dtype) * F.log_softmax(z, dim=1)).sum(1).mean()
        return F.cross_entropy(z, labels, label_smoothing=label_smoothing)
    if loss == "gce":
        return gce(z, labels, gce_q)
    if loss == "sce":
        return sce(z, labels, sce_alpha, sce_beta)
    raise ValueError(f"unknown label loss {loss!r}; expected one of {', '.join(LABEL_LOSSES)}")
