"""Networks from torchvision (``tv:NAME``) and timm (``timm:NAME``) as kdfine Classifiers.

The library's network keeps everything up to its final linear classifier; that layer becomes a
new ``Linear(D, K)`` head for the data's K classes, so ``features(x)`` (B, D) is the input of the
final linear layer (timm: ``forward_head(forward_features(x), pre_logits=True)``, which is what a
timm model built with ``num_classes=0`` returns). The registry builds them with random weights,
which is also how :func:`kdfine.models.checkpoint.load` rebuilds one (no network access);
:func:`build_pretrained` loads the library's default weights through the library's own cache.

torchvision is a dependency; timm is the optional extra ``timm``.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdfine.errors import InputError, UsageError
from kdfine.models import register_prefix
from kdfine.models.base import Classifier

TIMM_HINT = "pip install 'kdfine[timm]'"
PREFIXES = ("tv", "timm")
_AUX = ("AuxLogits", "aux1", "aux2")  # inception/googlenet auxiliary classifiers, dropped


@dataclass(frozen=True)
class Weights:
    """A library's default pretrained weights: ``name`` (recorded as the checkpoint's ``init``),
    the normalisation they expect (per RGB channel, [0, 1] units) and their crop size in pixels."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int


class ZooClassifier(Classifier):
    """A library network without its final linear layer (``backbone``, output (B, D)) and a new
    ``head`` Linear(D, K). ``head_alias`` is the library's name of the replaced layer (``fc``,
    ``classifier.3``), so that its keys in a library state dict map onto ``head``; keys under
    ``ignored`` (dropped auxiliary classifiers) are not part of the model."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head_alias: str | None,
                 ignored: tuple[str, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)
        self.head_alias = head_alias
        self.ignored = ignored

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return f.flatten(1) if f.ndim > 2 else f


def split_arch(arch: str) -> tuple[str, str] | None:
    """``("tv", "resnet18")`` for ``tv:resnet18``; None for built-in names."""
    prefix, sep, name = arch.strip().partition(":")
    return (prefix.lower(), name.strip()) if sep and prefix.lower() in PREFIXES else None


def is_zoo(arch: str | None) -> bool:
    return arch is not None and split_arch(arch) is not None


# ------------------------------------------------------------------------------------ torchvision


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)  # classification models only


def _tv_check(name: str) -> None:
    if name not in _tv_names():
        raise UsageError(f"--arch tv:{name}: not a torchvision classification model; "
                         "`kdfine list-archs 'tv:*'` lists them")


def _tv_network(name: str, image_size: int) -> nn.Module:
    """torchvision's ``name`` with random weights and its ImageNet classifier (1000 classes)."""
    import torchvision.models as tvm

    _tv_check(name)
    kwargs = {"image_size": image_size} if name.startswith("vit_") else {}  # ViTs are built for one size
    with warnings.catch_warnings():  # inception's notice about its future default init
        warnings.simplefilter("ignore", FutureWarning)
        return tvm.get_model(name, weights=None, **kwargs)


def tv_weights(name: str) -> tuple[Weights, str]:
    """The DEFAULT weights of torchvision's ``name`` and their download URL (no network access)."""
    import torchvision.models as tvm

    _tv_check(name)
    try:
        w = tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UsageError(f"--pretrained: torchvision has no pretrained weights for tv:{name}") from None
    t = w.transforms()
    return Weights(f"torchvision {w}", tuple(t.mean), tuple(t.std), int(t.crop_size[0])), w.url


def tv_weights_file(name: str) -> Path:
    """The DEFAULT weights file of ``name`` in TORCH_HOME's hub cache (``<hub>/checkpoints/FILE``),
    downloaded there when absent and checked against the hash in its name
    (:func:`kdfine.models.hub.tv_file`); exit 3 naming the file and the fix."""
    from kdfine.models.hub import tv_file

    return tv_file(name, tv_weights(name)[1], Path(torch.hub.get_dir()))


def _tv_state_dict(name: str) -> tuple[dict[str, torch.Tensor], Weights]:
    """The DEFAULT weights of ``name`` (:func:`tv_weights_file`) as a state dict."""
    weights = tv_weights(name)[0]
    path = tv_weights_file(name)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"--pretrained tv:{name}: {path} is not a readable state dict ({e}); delete it") from None
    if not isinstance(sd, dict):
        raise InputError(f"--pretrained tv:{name}: {path} holds no state dict; delete it")
    return sd, weights


def _wrap_tv(net: nn.Module, name: str, k: int, c: int, s: int) -> ZooClassifier:
    """Drop auxiliary classifiers, replace the final Linear by the new head, adapt the stem to
    ``c`` input channels, and check that the network runs on ``s`` x ``s`` inputs."""
    ignored = tuple(f"{a}." for a in _AUX if getattr(net, a, None) is not None)
    for a in _AUX:
        if hasattr(net, a):
            setattr(net, a, None)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"--arch tv:{name}: has no final linear classifier, so it has no features for FINE; "
                         "choose another network")
    alias, last = linears[-1]
    net.set_submodule(alias, nn.Identity())
    if c != 3:
        _adapt_stem(net, c)
    model = ZooClassifier(net, last.in_features, k, alias, ignored)
    _probe(model, f"tv:{name}", c, s)
    return model


def _adapt_stem(net: nn.Module, c: int) -> None:
    """The first 3-channel convolution takes ``c`` channels: its RGB filters averaged, so that a
    grey image replicated to RGB would give the same response."""
    name, conv = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
                      (None, None))
    if conv is None:
        return
    new = nn.Conv2d(c, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(1, keepdim=True).expand(-1, c, -1, -1) / c)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    net.set_submodule(name, new)


def _probe(model: ZooClassifier, arch: str, c: int, s: int) -> None:
    """One eval-mode forward at (1, c, s, s): a network that cannot run at this size (ViTs, too
    many downsamplings) is a usage error now, not a traceback in the first batch."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            f = model.features(torch.zeros(1, c, s, s))
    except Exception as e:
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UsageError(f"--arch {arch} does not run on {s}x{s} images ({detail}); pass --image-size N "
                         "with a size it accepts (e.g. 224 for ViTs, a multiple of the patch size)") from None
    finally:
        model.train(was)
    if f.shape[1] != model.feature_dim:
        raise UsageError(f"--arch {arch}: features have {f.shape[1]} dims, its head expects {model.feature_dim}")


def _tv_build(name: str, k: int, c: int, s: int) -> Classifier:
    try:
        net = _tv_network(name, s)
    except (AssertionError, ValueError) as e:
        raise UsageError(f"--arch tv:{name} cannot be built for {s}x{s} images ({e}); pass --image-size N") from None
    return _wrap_tv(net, name, k, c, s)


# ------------------------------------------------------------------------------------ timm


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError(f"timm: networks need the timm package, which is not installed; {TIMM_HINT}") from None
    return timm


def _timm_check(name: str) -> Any:
    timm = _timm()
    if not timm.is_model(name):
        raise UsageError(f"--arch timm:{name}: not a timm model; `kdfine list-archs 'timm:*'` lists them")
    return timm


def timm_weights(name: str) -> Weights:
    """The default pretrained configuration of timm's ``name`` (no network access)."""
    timm = _timm_check(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:
        raise UsageError(f"--pretrained timm:{name}: {e}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UsageError(f"--pretrained: timm has no pretrained weights for timm:{name}")
    tag = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else name
    return Weights(f"timm {tag}", tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1]))


def _timm_create(name: str, c: int, s: int, pretrained: bool) -> nn.Module:
    """timm's ``name`` without classifier; when it does not run at ``s`` as built (ViTs), built
    again for ``img_size=s`` (timm resamples pretrained position embeddings itself)."""
    timm = _timm_check(name)
    kw = {"num_classes": 0, "in_chans": c}
    net = _timm_call(timm, name, pretrained, kw)
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, c, s, s))
        return net
    except Exception:
        try:
            return _timm_call(timm, name, pretrained, {**kw, "img_size": s})
        except TypeError:  # no img_size argument: _probe reports the size problem
            return net


def timm_weights_file(name: str) -> str | None:
    """The local file of timm's default pretrained weights of ``name`` from the Hugging Face cache,
    checked, or downloaded when the hub answers (:func:`kdfine.models.hub.timm_file`); None for
    weights that timm fetches from a URL itself. Exit 3 at once when they cannot be had."""
    from kdfine.models.hub import timm_file

    timm = _timm_check(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    return timm_file(name, cfg.hf_hub_id, cfg.hf_hub_filename)


def _timm_call(timm: Any, name: str, pretrained: bool, kw: dict[str, Any]) -> nn.Module:
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kw)
    local = timm_weights_file(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": local} if local else None,
                                     **kw)
    except TypeError:
        raise
    except Exception as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        what = f"{local} is not a readable weights file" if local else "its weights could not be downloaded"
        raise InputError(f"--pretrained timm:{name}: {what} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"delete it from {HF_HUB_CACHE} to fetch it again, or set HF_HOME to a cache that has "
                         "it") from None


def _timm_build(name: str, k: int, c: int, s: int, pretrained: bool = False) -> ZooClassifier:
    net = _timm_create(name, c, s, pretrained)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    dim = int(getattr(net, "head_hidden_size", None) or getattr(net, "num_features"))
    model = ZooClassifier(net, dim, k, cfg.get("classifier") if isinstance(cfg.get("classifier"), str) else None)
    _probe(model, f"timm:{name}", c, s)
    return model


# ------------------------------------------------------------------------------------ the API


def pretrained_file(arch: str) -> str | None:
    """The file ``--pretrained`` will load for ``arch``, found (or downloaded) and verified now,
    before any data loads; None for timm weights fetched from a URL by timm itself."""
    prefix, name = split_arch(arch) or ("", arch)
    if prefix == "tv":
        return str(tv_weights_file(name))
    pretrained_weights(arch)  # a usage error for weights that do not exist
    return timm_weights_file(name)


def pretrained_weights(arch: str) -> Weights:
    """The default weights ``--pretrained`` would load for ``arch``, without loading them."""
    parts = split_arch(arch)
    if parts is None:
        raise UsageError(f"--pretrained needs a tv:NAME or timm:NAME --arch; {arch} is a built-in network "
                         "without pretrained weights")
    return tv_weights(parts[1])[0] if parts[0] == "tv" else timm_weights(parts[1])


def build_pretrained(arch: str, num_classes: int, in_channels: int, image_size: int) -> tuple[Classifier, Weights]:
    """``arch`` with the library's default pretrained weights (cached, or downloaded into the
    library's cache) and a new random head; exit 3 when the weights cannot be had."""
    prefix, name = split_arch(arch) or ("", arch)
    if prefix == "tv":
        if name.startswith("vit_") and image_size != tv_weights(name)[0].image_size:
            raise UsageError(f"--arch {arch} --pretrained: its weights are for {tv_weights(name)[0].image_size}px "
                             f"images, not {image_size}px; pass --image-size {tv_weights(name)[0].image_size}")
        sd, weights = _tv_state_dict(name)
        net = _tv_network(name, image_size)
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise InputError(f"--pretrained tv:{name}: the cached weights do not fit the network "
                             f"({str(e).splitlines()[0][:160]})") from None
        return _wrap_tv(net, name, num_classes, in_channels, image_size), weights
    weights = pretrained_weights(arch)
    return _timm_build(name, num_classes, in_channels, image_size, pretrained=True), weights


def list_names(prefix: str, pattern: str) -> list[str]:
    """``PREFIX:NAME`` for the library's models whose name matches ``pattern`` (fnmatch)."""
    names = _tv_names() if prefix == "tv" else _timm().list_models()
    return [f"{prefix}:{n}" for n in names if fnmatch.fnmatchcase(n, pattern)]


def param_count_cheap(arch: str, num_classes: int) -> int | None:
    """Parameters of ``arch`` with a K-class head, counted on the meta device (no memory, no
    weights); None when the network cannot be built that way."""
    prefix, name = split_arch(arch) or ("", "")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if prefix == "tv":
                net = _tv_network(name, 224)
                last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
            else:
                net = _timm().create_model(name, pretrained=False, num_classes=0)
                last = None
            dim = last.in_features if last is not None else int(getattr(net, "head_hidden_size", None)
                                                                    or net.num_features)
            total = sum(p.numel() for p in net.parameters())
    except Exception:
        return None
    own = 0 if last is None else last.weight.numel() + (last.bias.numel() if last.bias is not None else 0)
    return total - own + dim * num_classes + num_classes


def _resolver(prefix: str) -> Callable[[str, int, int, int], Classifier]:
    def resolve(name: str, k: int, c: int, s: int) -> Classifier:
        return _tv_build(name, k, c, s) if prefix == "tv" else _timm_build(name, k, c, s)

    return resolve


for _p in PREFIXES:
    register_prefix(_p, _resolver(_p), lister=lambda pattern, p=_p: list_names(p, pattern),
                    check=_tv_check if _p == "tv" else _timm_check)
