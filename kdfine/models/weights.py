"""Initial weights from a local file (``--init``) and the frozen backbone (``--freeze-backbone``).

``--init FILE`` takes a state dict: ``.safetensors`` (a kdfine checkpoint is one), or ``.pth`` /
``.pt`` read with ``torch.load(weights_only=True)`` — tensors only, never a pickled object. Keys are
matched by name (a library's own names too: ``fc.weight`` of a torchvision ResNet is the head of
``tv:resnet18``, everything else sits under ``backbone.``) and shape.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from kdfine.errors import InputError, KdfineWarning
from kdfine.files.inputs import regular_file

_NESTED = ("state_dict", "model", "model_state_dict", "module")  # common wrappers of a state dict


def read_state_dict(path: str | Path, what: str = "--init") -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file and the file's sha256; exit 3 for a
    missing, special (a FIFO would block), unreadable or tensor-free file, and for a state dict
    that is not names -> ordinary finite tensors (see :func:`check_tensors`)."""
    p = regular_file(path, what, "a .safetensors, .pth or .pt file")
    suffix = p.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise InputError(f"{what} {p}: expected a .safetensors, .pth or .pt file")
    if p.stat().st_size == 0:
        raise InputError(f"{what} {p}: the file is empty; expected a state dict")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "safe_globals" in text:  # weights_only met a class: a pickled object
            raise InputError(f"{what} {p}: holds pickled Python objects (a whole model saved with torch.save(model)?), "
                             "which kdfine never loads; save the weights alone: torch.save(model.state_dict(), "
                             "PATH), or a .safetensors file") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # torch's reason, after its long preamble
        why = detail.group(1) if detail else _plain(e)
        raise InputError(f"{what} {p}: not a readable state dict ({why})") from None
    except Exception as e:  # damaged files fail to parse
        raise InputError(f"{what} {p}: not a readable state dict ({_plain(e)})") from None
    for key in _NESTED:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise InputError(f"{what} {p}: holds no state dict of tensors")
    problem = check_tensors(sd)
    if problem:
        raise InputError(f"{what} {p}: {problem}; expected a state dict of ordinary finite tensors")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return {k.removeprefix("module."): v for k, v in sd.items()}, digest


def check_tensors(sd: dict) -> str | None:
    """What is wrong with ``sd`` as a state dict, or None: every key a string, every value a dense
    tensor with storage (not meta, sparse or quantized), every float tensor finite."""
    for k, v in sd.items():
        name = repr(k)[:60]
        if not isinstance(k, str):
            return f"key {name} is not a name"
        if not isinstance(v, torch.Tensor):
            return f"{name} is a {type(v).__name__}, not a tensor"
        if v.layout != torch.strided or v.is_meta or v.is_quantized:
            kind = "meta" if v.is_meta else "quantized" if v.is_quantized else str(v.layout).removeprefix("torch.")
            return f"tensor {name} is {kind}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"tensor {name} holds NaN or inf"
        if v.is_complex():
            return f"tensor {name} is complex"
    return None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


def _plain(e: Exception) -> str:
    """The first line of an exception's message, without terminal colour codes, at most 160 chars."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return (text.splitlines()[0][:160] if text else type(e).__name__)


def _model_key(key: str, model: nn.Module, own: dict[str, torch.Tensor]) -> str | None:
    """The model's name for a file's ``key``: itself, under ``backbone.``, or the library's
    classifier (``head_alias``) as ``head``; None when it is no part of the model."""
    if key in own:
        return key
    alias = getattr(model, "head_alias", None)
    if alias and key.startswith(alias + ".") and "head." + key[len(alias) + 1:] in own:
        return "head." + key[len(alias) + 1:]
    if "backbone." + key in own:
        return "backbone." + key
    return None


def load_init(model: nn.Module, path: str | Path) -> str:
    """Load ``path`` into ``model`` in place; returns the ``init`` record (``sha256:HEX``).

    Every tensor of the model must come from the file with its shape, except the head: a head of
    another size (or none in the file) stays freshly initialised, with a note on stderr. Anything
    else missing, extra or of another shape is exit 3, naming the first few keys."""
    sd, digest = read_state_dict(path)
    own = model.state_dict()
    ignored = tuple(getattr(model, "ignored", ()))
    mapped: dict[str, torch.Tensor] = {}
    extra, wrong, head_wrong = [], [], []
    for k, v in sd.items():
        target = _model_key(k, model, own)
        if target is None:
            if not (ignored and k.startswith(ignored)):
                extra.append(k)
        elif own[target].shape != v.shape:
            (head_wrong if target.startswith("head.") else wrong).append(f"{k} {tuple(v.shape)} vs "
                                                                         f"{tuple(own[target].shape)}")
        elif own[target].is_floating_point() != v.is_floating_point():
            wrong.append(f"{k} holds {str(v.dtype).removeprefix('torch.')}, not "
                         f"{str(own[target].dtype).removeprefix('torch.')}")
        else:
            mapped[target] = v
    head_missing = [k for k in own if k not in mapped and k.startswith("head.")]
    missing = [k for k in own if k not in mapped and not k.startswith("head.")]
    if extra or wrong or missing:
        from kdfine.models.checkpoint import mismatch

        raise InputError(f"--init {path}: does not fit the network ({mismatch(missing, extra, wrong)})")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
    if head_wrong or head_missing:
        why = f"its head is {head_wrong[0].split(' ', 1)[1]}" if head_wrong else "it has no head"
        warnings.warn(f"--init {path}: {why}; the head starts fresh for this data's classes", KdfineWarning,
                      stacklevel=2)
    return f"sha256:{digest}"


def freeze_backbone(model: nn.Module) -> int:
    """Train the head only: every parameter outside ``head`` stops needing gradients and the
    backbone stays in eval mode (BatchNorm statistics and dropout as in inference), see
    :meth:`kdfine.models.base.Classifier.train`. Returns the number of trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
    model.frozen_backbone = True
    model.train(model.training)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def initial_model(arch: str, num_classes: int, in_channels: int, image_size: int, *, pretrained: bool = False,
                  init: str | None = None, freeze: bool = False) -> tuple[nn.Module, str | None]:
    """A new ``arch`` network with its initial weights: random (seeded by the caller), the
    library's pretrained ones, or ``init``'s; the head only trains when ``freeze``. Returns the
    model and its ``init`` record (the weights' name, ``sha256:HEX`` of the file, or None)."""
    from kdfine.models import build

    record = None
    if pretrained:
        from kdfine.models.zoo import build_pretrained

        model, weights = build_pretrained(arch, num_classes, in_channels, image_size)
        record = weights.name
    else:
        model = build(arch, num_classes, in_channels, image_size)
        if init:
            record = load_init(model, init)
    if freeze:
        freeze_backbone(model)
    return model, record
