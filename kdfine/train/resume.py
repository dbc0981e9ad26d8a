"""The per-epoch resume state beside a run's ``--out``: one safetensors file, written atomically.

Tensors: each network's state dict (``model{i}.NAME``), each optimizer's ``state_dict()`` tensors
(``optim{i}.PARAM.KEY``), the strategy's own tensors (e.g. ``selection``) and the CPU RNG state
(``rng.cpu``). Metadata ``kdfine_state`` (JSON): epoch, history, the run's config, the optimizers'
non-tensor state and param groups, and the strategy's JSON fields. No pickle.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kdfine.errors import InputError, UsageError
from kdfine.files.outputs import Outputs

# What the states of older kdfine versions, which lack these keys, ran with (their FINE features
# were the plain images; images of other sizes were centre-cropped).
BEFORE_KEYS = {"optimizer": "sgd", "nesterov": True, "decay_all": False, "warmup_epochs": 0, "label_smoothing": 0.0,
               "val_fraction": 0.0, "keep_best": "last", "fine_features": "plain",
               "resize": "crop", "norm": None}


def state_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch resume state of a run writing ``out`` lives."""
    return Path(f"{out}.state.safetensors")


def config_differences(saved: dict[str, Any], now: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """``key: old -> new`` for each of ``keys`` (the options that must match for a resume to continue
    the same run: :func:`kdfine.options.resume_keys`) whose value differs."""
    saved = {**{k: v for k, v in BEFORE_KEYS.items() if k in now}, **saved}
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def upgrade_precision(saved: dict[str, Any], device_type: str, teacher_now: str | None) -> dict[str, Any]:
    """A saved run config with the precisions as this kdfine records them. States written before
    ``--precision auto`` could mean bf16 on a CPU recorded the option itself ("auto", which then
    meant bf16 on CUDA and fp32 elsewhere) and no teachers' precision (whose rule has not changed:
    ``teacher_now``)."""
    if not saved or ("teacher_precision" in saved and saved.get("precision") != "auto"):
        return saved
    out = dict(saved)
    if out.get("precision") == "auto":
        out["precision"] = "bf16" if device_type == "cuda" else "fp32"
    out.setdefault("teacher_precision", teacher_now if out.get("teachers") else None)
    return out


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
               tensors: dict[str, torch.Tensor], info: dict[str, Any], outputs: Outputs | None = None) -> None:
    """Networks, optimizers, the strategy's ``tensors``, the CPU RNG and ``info`` (JSON) in one
    file, written atomically, so a crash leaves either the previous state or the new one.
    ``outputs``: the run's declared outputs, ``path`` among them (default: a set of its own)."""
    from safetensors.torch import save as st_save

    from kdfine.models.checkpoint import state_tensors

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
    data = st_save(out, metadata=meta)
    if outputs is not None:
        outputs.write_now(path, data)
        return
    with Outputs() as own:
        own.add(path, "state")
        own.write_now(path, data)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) of a state file; exit 3 with the fix when it cannot be read or is not what
    kdfine writes (:func:`check_state`). The file lives beside ``--out``, where others may be able
    to write: it must be a regular file of this user, not a link."""
    from safetensors import safe_open

    _check_own_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            info = json.loads((f.metadata() or {})["kdfine_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(info, dict) or "optimizers" not in info or "rng.cpu" not in tensors:
            raise ValueError("written by an older kdfine")
        check_state(tensors, info)
    except Exception as e:  # safetensors' own errors, JSON (deep nesting included), check_state
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise InputError(f"resume state {path}: unreadable ({why}); delete it to start from scratch") from None
    return tensors, info


def _check_own_file(path: Path) -> None:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise InputError(f"resume state {path}: cannot read ({e.strerror or e})") from None
    why = ("is a symbolic link" if stat.S_ISLNK(st.st_mode) else "is not a regular file" if not stat.S_ISREG(st.st_mode)
           else "belongs to another user" if st.st_uid != os.geteuid() else None)
    if why:
        raise InputError(f"resume state {path}: {why}; kdfine resumes only from a state file it wrote: "
                         "delete it (check who made it) or choose another --out")


def check_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Raise ValueError unless ``info`` has the fields and types that :func:`save_state` writes
    (a number of epochs and, when there is a history, one record per epoch; the optimizers' JSON
    naming tensors that exist) and the RNG state is a CPU generator's."""
    epoch, history = info.get("epoch"), info.get("history")
    if type(epoch) is not int or epoch < 0:
        raise ValueError("its epoch is not a number of epochs")
    if history is not None and (not isinstance(history, list) or len(history) != epoch
                                or not all(isinstance(r, dict) for r in history)):
        raise ValueError("its history is not one record per epoch")
    if not isinstance(info.get("config", {}), dict):
        raise ValueError("its config is not what kdfine writes")
    best = info.get("best_epoch")
    if best is not None and (type(best) is not int or not 1 <= best <= epoch
                             or not isinstance(info.get("best_val"), (int, float))):
        raise ValueError("its best epoch is not one of its epochs")
    if not isinstance(info["optimizers"], list) or not all(_optimizer_ok(o, tensors) for o in info["optimizers"]):
        raise ValueError("its optimizer state is not what kdfine writes")
    rng = tensors["rng.cpu"]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise ValueError("its random generator state is not a CPU generator's")


def _optimizer_ok(flat: Any, tensors: dict[str, torch.Tensor]) -> bool:
    if not isinstance(flat, dict) or not isinstance(flat.get("state"), dict):
        return False
    if not isinstance(flat.get("param_groups"), list):
        return False
    groups_ok = all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    and all(type(p) is int for p in g["params"]) for g in flat["param_groups"])
    entries_ok = all(pid.isdigit() and isinstance(entries, dict) and all(
        isinstance(v, dict) and (v.get("tensor") in tensors if "tensor" in v else "value" in v)
        for v in entries.values()) for pid, entries in flat["state"].items())
    return groups_ok and entries_ok


def check_indices(path: Path, tensors: dict[str, torch.Tensor], n: int) -> None:
    """The strategy's own index tensors (``selection``, ``val_index``, ...: the names without a
    dot) must be unique positions in ``[0, n)`` of the training set; its float ones (``p_clean``)
    probabilities. Exit 3 otherwise."""
    for name, t in tensors.items():
        if "." in name:
            continue
        if t.dtype == torch.int64:
            ok = t.ndim == 1 and t.numel() <= n and (t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) < n
                                                                         and t.unique().numel() == t.numel()))
        else:
            ok = t.ndim == 1 and t.is_floating_point() and bool(((t >= 0) & (t <= 1)).all())
        if not ok:
            what = "positions" if t.dtype == torch.int64 else "probabilities"
            raise InputError(f"resume state {path}: '{name}' is not a set of {n} training samples' {what}; "
                             "delete it to start from scratch")


def check_config(path: Path, info: dict[str, Any], run_config: dict[str, Any], force: bool,
                 keys: Sequence[str]) -> None:
    """Refuse (exit 2) to resume a run whose options (``keys`` of the run config) differ from the
    saved ones, unless ``force``."""
    diffs = config_differences(info.get("config", {}), run_config, keys)
    data = [d for d in diffs if d.startswith("train_set:")]
    if data and not force:  # the same options on other images, labels or --keep
        raise UsageError(f"--resume: {path} was saved while training on other data ({data[0]}): the images, "
                         "labels or --keep changed since; restore them, or delete the state to start from scratch")
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
        shapes = {k: v.shape for k, v in models[0].state_dict().items()}
        best = {k[5:]: v.shape for k, v in tensors.items() if k.startswith("best.")}
        if best and best != shapes:
            raise RuntimeError("the best epoch's weights do not fit the network")
        for opt, flat in zip(optimizers, info["optimizers"]):
            _load_optimizer(opt, unflatten_optimizer(tensors, flat))
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
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
