"""Initial weights from a local file (``--init``) and the frozen backbone (``--freeze-backbone``).

``--init FILE`` takes a state dict: ``.safetensors`` (a kdfine checkpoint is one), or ``.pth`` /
``.pt`` read with ``torch.load(weights_only=True)`` — tensors only, never a pickled object. Keys are
matched by name (a library's own names too: ``fc.weight`` of a torchvision ResNet is the head of
``tv:resnet18``, everything else sits under ``backbone.``) and shape.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from kdfine.errors import InputError, KdfineWarning

_NESTED = ("state_dict", "model", "model_state_dict", "module")  # common wrappers of a state dict


def read_state_dict(path: str | Path, what: str = "--init") -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file and the file's sha256; exit 3 for a
    missing, unreadable or tensor-free file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        elif suffix in (".pth", ".pt", ".bin"):
            sd = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise InputError(f"{what} {p}: expected a .safetensors, .pth or .pt file")
    except InputError:
        raise
    except Exception as e:  # weights_only refuses pickled objects; damaged files fail to parse
        raise InputError(f"{what} {p}: not a readable state dict ({str(e).splitlines()[0][:160]})") from None
    for key in _NESTED:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{what} {p}: holds no state dict of tensors")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return {k.removeprefix("module."): v for k, v in sd.items()}, digest


def _model_key(key: str, model: nn.Module, own: dict[str, torch.Tensor]) -> str | None:
    """The model's name for a file's ``key``: itself, under ``backbone.``, or the library's
    classifier (``head_alias``) as ``head``; None when it is no part of the model."""
    if key in own:
        return key
    alias = getattr(model, "head_alias", None)
    if alias and key.startswith(alias + "."):
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
    extra, wrong = [], []
    for k, v in sd.items():
        target = _model_key(k, model, own)
        if target is None:
            if not (ignored and k.startswith(ignored)):
                extra.append(k)
        elif own[target].shape != v.shape:
            wrong.append(f"{k} {tuple(v.shape)} vs {tuple(own[target].shape)}")
        else:
            mapped[target] = v
    missing = [k for k in own if k not in mapped]
    head_wrong = [w for w in wrong if _model_key(w.split(" ")[0], model, own).startswith("head.")]
    head_missing = [k for k in missing if k.startswith("head.")]
    wrong = [w for w in wrong if w not in head_wrong]
    missing = [k for k in missing if not k.startswith("head.")]
    if extra or wrong or missing:
        from kdfine.checkpoint import mismatch

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
