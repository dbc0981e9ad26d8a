"""The per-epoch resume state beside a run's ``--out``: one safetensors file, written atomically.

Tensors: each network's state dict (``model{i}.NAME``), each optimizer's ``state_dict()`` tensors
(``optim{i}.PARAM.KEY``), the strategy's own tensors (e.g. ``selection``) and the CPU RNG state
(``rng.cpu``). Metadata ``kdfine_state`` (JSON): epoch, history, the run's config, the optimizers'
non-tensor state and param groups, and the strategy's JSON fields. No pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kdfine.errors import InputError, UsageError

RESUME_KEYS = ("arch", "data", "label_noise", "noise_seed", "labels", "keep", "loss", "tau", "alpha", "teachers",
               "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "seed", "fine_warmup",
               "fine_every", "fine_zeta", "fine_method", "image_size", "resize", "augment", "test_fraction",
               "fine_strategy", "gce_q", "sce_alpha", "sce_beta", "ssl_lambda_u", "ssl_threshold", "ssl_alpha", "ssl_temperature",
               "train_set", "optimizer", "nesterov", "decay_all", "warmup_epochs", "label_smoothing", "val_fraction",
               "keep_best", "fine_features")

# What the states of older kdfine versions, which lack these keys, ran with (their FINE features
# were the plain images; images of other sizes were centre-cropped).
BEFORE_KEYS = {"optimizer": "sgd", "nesterov": True, "decay_all": False, "warmup_epochs": 0, "label_smoothing": 0.0,
               "val_fraction": 0.0, "keep_best": "last", "fine_features": "plain",
               "resize": "crop"}


def state_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch resume state of a run writing ``out`` lives."""
    return Path(f"{out}.state.safetensors")


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each option that must match for a resume to continue the same run."""
    saved = {**{k: v for k, v in BEFORE_KEYS.items() if k in now}, **saved}
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now.get(k)]


def flatten_optimizer(sd: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors named ``PREFIX.PARAM.KEY``, JSON for the rest).

    The JSON keeps the param groups as they are and, per parameter, its non-tensor values (a
    momentum buffer that SGD has not made yet is ``None``) and the names of its tensor values."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().cpu().contiguous().clone()
                state[str(pid)][key] = {"tensor": f"{prefix}.{pid}.{key}"}
            else:
                state[str(pid)][key] = {"value": value}
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`: a dict for ``optimizer.load_state_dict``."""
    state = {int(pid): {key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entries.items()}
             for pid, entries in flat["state"].items()}
    return {"state": state, "param_groups": flat["param_groups"]}


def save_state(path: Path, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
               tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Networks, optimizers, the strategy's ``tensors``, the CPU RNG and ``info`` (JSON) in one
    file, written atomically, so a crash leaves either the previous state or the new one."""
    from safetensors.torch import save as st_save

    from kdfine.checkpoint import state_tensors
    from kdfine.io import atomic_write_bytes

    out = dict(tensors)
    optim_json = []
    for i, model in enumerate(models):
        out.update({f"model{i}.{k}": v for k, v in state_tensors(model).items()})
    for i, opt in enumerate(optimizers):
        t, flat = flatten_optimizer(opt.state_dict(), f"optim{i}")
        out.update(t)
        optim_json.append(flat)
    out["rng.cpu"] = torch.get_rng_state()
    meta = {"kdfine_state": json.dumps({**info, "optimizers": optim_json}, sort_keys=True)}
    atomic_write_bytes(path, st_save(out, metadata=meta), option="state")


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) of a state file; exit 3 with the fix when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            info = json.loads((f.metadata() or {})["kdfine_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "optimizers" not in info or "rng.cpu" not in tensors:
            raise ValueError("written by an older kdfine")
    except Exception as e:
        raise InputError(f"resume state {path}: unreadable ({str(e).splitlines()[0][:120] if str(e) else e}); "
                         "delete it to start from scratch") from None
    return tensors, info


def check_config(path: Path, info: dict[str, Any], run_config: dict[str, Any], force: bool) -> None:
    """Refuse (exit 2) to resume a run whose options differ from the saved ones, unless ``force``."""
    diffs = config_differences(info.get("config", {}), run_config)
    if diffs and not force:
        raise UsageError(f"--resume: {path} was written with other options ({'; '.join(diffs)}); "
                         "rerun with the recorded options, or add --force")


def restore(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], models: Sequence[nn.Module],
            optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Load networks, optimizers and the CPU RNG from a state read by :func:`load_state`.

    The optimizers keep their current hyperparameters (so ``--force`` with another option applies
    it) and take the saved per-parameter state; exit 3 when the state does not fit the networks."""
    try:
        for i, model in enumerate(models):
            pre = f"model{i}."
            model.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        if len(info["optimizers"]) != len(optimizers):
            raise RuntimeError(f"{len(info['optimizers'])} optimizers saved, {len(optimizers)} here")
        for opt, flat in zip(optimizers, info["optimizers"]):
            _load_optimizer(opt, unflatten_optimizer(tensors, flat))
    except (RuntimeError, ValueError, KeyError) as e:
        detail = " ".join(str(e).split())[:200]
        raise InputError(f"--resume: {path} does not fit this model ({detail}); "
                         "delete it to start from scratch") from None
    torch.set_rng_state(tensors["rng.cpu"])


def _load_optimizer(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """``opt.load_state_dict(sd)`` after checking that every buffer has its parameter's shape
    (torch checks only the group sizes); the current hyperparameters are kept."""
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    if len(saved_ids) != len(params):
        raise RuntimeError(f"{len(saved_ids)} optimized parameters saved, {len(params)} here")
    shape = dict(zip(saved_ids, (p.shape for p in params)))
    for pid, entries in sd["state"].items():
        for key, v in entries.items():
            if isinstance(v, torch.Tensor) and v.ndim and v.shape != shape.get(pid):
                raise RuntimeError(f"optimizer {key} of parameter {pid} has shape {tuple(v.shape)}")
    current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(sd)
    for g, hyper in zip(opt.param_groups, current):
        g.update(hyper)
