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
- ``dkd``:    alpha * w(epoch) * (a * TCKD + b * NCKD) + (1 - alpha) * CE(z_s, y), decoupled KD (Zhao
              et al., CVPR 2022), a = ``dkd_alpha``, b = ``dkd_beta``, both terms tau^2-scaled: TCKD the
              KL between the binary (target, rest) distributions at tau, NCKD the KL between the
              distributions over the K - 1 non-target classes at tau. The target is the label y, so
              dkd reads the labels even at alpha = 1. w = min(epoch / dkd_warmup, 1), the authors'
              linear warm-up (epoch 1-based; 1 when no epoch is given or dkd_warmup is 0).
- ``kl-std``: ``kl`` on Z(z) = (z - mean(z)) / (std(z) + 1e-7) per sample (Bessel-corrected std),
              teacher and student alike: logit standardisation (Sun et al., CVPR 2024).

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
from kdfine.registry import Registry

__all__ = ["KD_LOSSES", "LABEL_LOSSES", "LOSSES", "kd_loss", "kl_term", "mse_term", "kl_inf_term", "dkd_term",
           "kl_std_term", "standardise", "dkd_warmup_factor", "gce", "sce", "label_loss"]

LOG_ZERO = -4.0  # SCE's clamp of log 0 in the reverse cross-entropy (Wang et al., 2019)
STD_EPS = 1e-7  # logit standardisation's guard of a zero std (the authors' code)

#: ``distill --loss``: the distillation term ``fn(z_s, z_t, y, *, tau, **params) -> scalar`` by name
#: (``ce``: the labels alone, no term); the command line reads the names from this file's decorators.
KD_LOSSES: Registry = Registry("distillation loss")
#: ``train-teacher --loss``: ``fn(logits, labels, **params) -> scalar`` on the labels alone.
LABEL_LOSSES: Registry = Registry("label loss")


@KD_LOSSES.register("ce", teacher=False)
def _ce_only(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, tau: float, **_) -> torch.Tensor:
    raise AssertionError("ce has no distillation term")  # kd_loss handles ce before any term


@KD_LOSSES.register("kl")
def _kl(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, tau: float, **_) -> torch.Tensor:
    return kl_term(zs, zt, tau)


@KD_LOSSES.register("mse")
def _mse(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, tau: float, **_) -> torch.Tensor:
    return mse_term(zs, zt)


@KD_LOSSES.register("kl-inf")
def _kl_inf(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, tau: float, **_) -> torch.Tensor:
    return kl_inf_term(zs, zt)


@KD_LOSSES.register("dkd")
def _dkd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, tau: float, dkd_alpha: float = 1.0,
         dkd_beta: float = 8.0, dkd_warmup: float = 0.0, epoch: float | None = None, **_) -> torch.Tensor:
    return dkd_warmup_factor(epoch, dkd_warmup) * dkd_term(zs, zt, y, tau, dkd_alpha, dkd_beta)


@KD_LOSSES.register("kl-std")
def _kl_std(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, tau: float, **_) -> torch.Tensor:
    return kl_std_term(zs, zt, tau)


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


def dkd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float,
             dkd_alpha: float = 1.0, dkd_beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD, dkd_alpha * TCKD + dkd_beta * NCKD, each tau^2 * the batch mean of a KL.

    logits: (B, K), K >= 2; labels: (B,) int64, the target class of each row. TCKD compares the
    binary distributions (p_target, 1 - p_target) of softmax(z/tau), in log space (log(1 - p) as
    logsumexp over the other classes minus logsumexp over all: no log of a rounded 0). NCKD compares
    softmax over the K - 1 non-target logits: the target column is removed (the other columns are
    gathered by index into (B, K - 1)) before the softmax, instead of subtracting a large constant
    from it, which is exact in any precision and cannot overflow; fixed shapes, no device sync."""
    k = student_logits.shape[1]
    if k < 2:
        raise ValueError(f"dkd needs at least 2 classes, got {k}")
    cols = torch.arange(k - 1, device=labels.device).unsqueeze(0)
    rest = cols + (cols >= labels.unsqueeze(1)).long()  # (B, K - 1): every column but the label's
    zs, zt = student_logits / tau, teacher_logits / tau
    zs_rest, zt_rest = zs.gather(1, rest), zt.gather(1, rest)
    tckd = F.kl_div(_binary_log_probs(zs, zs_rest, labels), _binary_log_probs(zt, zt_rest, labels),
                    reduction="batchmean", log_target=True)
    nckd = F.kl_div(F.log_softmax(zs_rest, dim=1), F.log_softmax(zt_rest, dim=1), reduction="batchmean",
                    log_target=True)
    return tau * tau * (dkd_alpha * tckd + dkd_beta * nckd)


def _binary_log_probs(z: torch.Tensor, z_rest: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 2): log p_target and log(1 - p_target) of softmax(z), z (B, K) and z_rest (B, K - 1)."""
    log_all = torch.logsumexp(z, dim=1, keepdim=True)
    return torch.cat([z.gather(1, labels.unsqueeze(1)), torch.logsumexp(z_rest, dim=1, keepdim=True)], 1) - log_all


def dkd_warmup_factor(epoch: float | None, warmup: float) -> float:
    """The authors' linear warm-up of the dkd term: min(epoch / warmup, 1), epoch 1-based (their
    trainer counts from 1, so the first epoch trains at 1/warmup); 1 without an epoch or warm-up."""
    if epoch is None or warmup <= 0:
        return 1.0
    return min(epoch / warmup, 1.0)


def standardise(logits: torch.Tensor) -> torch.Tensor:
    """Z(z) = (z - mean(z)) / (std(z) + 1e-7) per row of (B, K), K >= 2, the std Bessel-corrected
    (divided by K - 1), as the logit-standardisation code computes it. Rows of equal logits map to
    zeros; there the std's square root gets the subgradient 0 instead of torch's NaN."""
    c = logits - logits.mean(dim=1, keepdim=True)
    var = c.pow(2).sum(dim=1, keepdim=True) / (logits.shape[1] - 1)
    pos = var > 0
    std = torch.where(pos, torch.where(pos, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return c / (std + STD_EPS)


def kl_std_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(Z(z_t)/tau) || softmax(Z(z_s)/tau)), batch mean; Z: :func:`standardise`."""
    return kl_term(standardise(student_logits), standardise(teacher_logits), tau)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
            loss: str = "kl", tau: float = 4.0, alpha: float = 1.0, label_smoothing: float = 0.0,
            dkd_alpha: float = 1.0, dkd_beta: float = 8.0, dkd_warmup: float = 0.0,
            epoch: float | None = None) -> torch.Tensor:
    """The scalar training loss of one batch (see the module docstring).

    student_logits, teacher_logits: (B, K); labels: (B,) int64 (read when CE contributes, and
    always by dkd); label_smoothing: of the CE terms (``--label-smoothing``, torch's definition),
    default 0. dkd_alpha, dkd_beta: dkd's weights of TCKD and NCKD (default 1 and 8); dkd_warmup
    and epoch (the 1-based epoch in progress): dkd's warm-up factor, :func:`dkd_warmup_factor`
    (default: none, the term at full weight).
    """
    zs = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    if loss == "ce" or teacher_logits is None:
        if loss != "ce":
            raise UsageError(f"--loss {loss} needs a teacher")
        return F.cross_entropy(zs, labels, label_smoothing=label_smoothing)
    zt = teacher_logits.to(zs.dtype)
    kd = KD_LOSSES.get(loss)(zs, zt, labels, tau=tau, dkd_alpha=dkd_alpha, dkd_beta=dkd_beta, dkd_warmup=dkd_warmup,
                             epoch=epoch)
    if alpha >= 1.0:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(zs, labels, label_smoothing=label_smoothing)


def _targets(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) targets: one-hot of int labels (B,), or soft targets (B, K) as given."""
    if labels.ndim == 2:
        return labels.to(dtype)
    return F.one_hot(labels, k).to(dtype)


@LABEL_LOSSES.register("ce")
def _label_ce(z: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    if labels.ndim == 2:
        return -(labels.to(z.dtype) * F.log_softmax(z, dim=1)).sum(1).mean()
    return F.cross_entropy(z, labels, label_smoothing=label_smoothing)


@LABEL_LOSSES.register("gce")
def _label_gce(z: torch.Tensor, labels: torch.Tensor, *, gce_q: float = 0.7, **_) -> torch.Tensor:
    return gce(z, labels, gce_q)


@LABEL_LOSSES.register("sce")
def _label_sce(z: torch.Tensor, labels: torch.Tensor, *, sce_alpha: float = 0.1, sce_beta: float = 1.0,
               **_) -> torch.Tensor:
    return sce(z, labels, sce_alpha, sce_beta)


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
    return LABEL_LOSSES.get(loss)(z, labels, gce_q=gce_q, sce_alpha=sce_alpha, sce_beta=sce_beta,
                                  label_smoothing=label_smoothing)


LOSSES = KD_LOSSES.names()  # the names distill --loss accepts
