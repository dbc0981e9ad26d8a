"""The architecture registry: ``build(arch, num_classes, in_channels, image_size)`` and ``list_archs``.

Every model is a :class:`Classifier`: ``model(x)`` returns logits (B, K) and ``model.features(x)``
the penultimate representation (B, D) that FINE and ``eval --dump-features`` use, with
``model.head(model.features(x)) == model(x)``.

Three kinds of entries, looked up in this order:

- names, registered with the :func:`register` decorator (``resnet20``);
- families, registered with :func:`register_family` by a regular expression whose groups are the
  parameters (``wrn-D-W``); the builder validates them and raises :class:`UsageError`;
- prefixes, registered with :func:`register_prefix` (``tv:`` -> a resolver given ``NAME``), for
  networks that come from other libraries.

Provider modules (:data:`PROVIDERS`) register their entries when imported; they are imported on
the first lookup, so that importing this package stays cheap.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from kdfine.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from kdfine.models.base import Classifier

#: Builder of a named network: (num_classes, in_channels, image_size) -> Classifier.
Builder = Callable[[int, int, int], "Classifier"]
#: Builder of a family member: (match groups, num_classes, in_channels, image_size) -> Classifier.
FamilyBuilder = Callable[[tuple, int, int, int], "Classifier"]
#: Resolver of a prefixed name: (NAME after the prefix, num_classes, in_channels, image_size).
PrefixResolver = Callable[[str, int, int, int], "Classifier"]

#: Modules whose import registers entries; a new module (``kdfine.models.zoo``) appends itself here.
PROVIDERS: list[str] = ["kdfine.models.cifar", "kdfine.models.zoo"]


@dataclass(frozen=True)
class Family:
    """A parametrised family: ``name`` as listed (``wrn-D-W``), ``regex`` matched against the
    lower-cased arch, ``examples`` listed beside it, ``build`` called with the match groups."""

    name: str
    regex: str
    examples: tuple[str, ...]
    build: FamilyBuilder


_NAMES: dict[str, Builder] = {}
_FAMILIES: list[Family] = []
_PREFIXES: dict[str, tuple[PrefixResolver, str]] = {}
_LISTERS: dict[str, Callable[[str], list[str]]] = {}
_loaded = False


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(num_classes, in_channels, image_size)`` under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _NAMES:
            raise ValueError(f"architecture {name!r} registered twice")
        _NAMES[name] = fn
        return fn

    return deco


def register_family(name: str, regex: str, examples: tuple[str, ...] = ()) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator: register a family builder ``fn(groups, num_classes, in_channels, image_size)``
    for names that fully match ``regex``; ``name`` (e.g. ``cnn[-W]``) and ``examples`` are listed."""

    def deco(fn: FamilyBuilder) -> FamilyBuilder:
        _FAMILIES.append(Family(name, regex, tuple(examples), fn))
        return fn

    return deco


def register_prefix(prefix: str, resolver: PrefixResolver, listed_as: str | None = None,
                    lister: Callable[[str], list[str]] | None = None,
                    check: Callable[[str], None] | None = None) -> None:
    """Resolve every arch ``PREFIX:NAME`` (e.g. ``tv:resnet18``) with ``resolver(NAME, k, c, s)``;
    ``list_archs`` shows it as ``listed_as`` (default ``PREFIX:NAME``) and, for a pattern
    ``PREFIX:GLOB``, the names ``lister(GLOB)`` returns (``PREFIX:NAME`` each); :func:`check_arch`
    calls ``check(NAME)`` instead of building it."""
    _PREFIXES[prefix] = (resolver, listed_as or f"{prefix}:NAME")
    if lister is not None:
        _LISTERS[prefix] = lister
    if check is not None:
        _NAME_CHECKS[prefix] = check


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PROVIDERS:
            importlib.import_module(module)


def list_archs(pattern: str | None = None) -> list[str]:
    """Sorted registered names, each family's listed name and examples, and each prefix's form
    (``tv:NAME``); with ``pattern``, only those matching it (fnmatch style, e.g. ``resnet*``), and
    for ``PREFIX:GLOB`` (``tv:mobilenet*``) the library's matching names."""
    _load()
    out = set(_NAMES)
    for fam in _FAMILIES:
        out.update((fam.name, *fam.examples))
    out.update(listed for _, listed in _PREFIXES.values())
    head, sep, glob = (pattern or "").partition(":")
    for prefix, lister in _LISTERS.items():
        if sep and fnmatch.fnmatchcase(prefix, head.lower()):
            out.update(lister(glob))  # the library's names, e.g. tv:mobilenet_v3_small for 'tv:mobilenet*'
    names = sorted(out)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern.lower())]


def arch_help() -> str:
    """``list_archs()`` as one line for help texts and error messages."""
    return ", ".join(list_archs())


def build(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> Classifier:
    """Build ``arch`` for inputs (B, in_channels, image_size, image_size) and ``num_classes`` outputs.
    Raises :class:`UsageError` (exit 2) for an unknown name or bad family parameters."""
    _load()
    name = arch.strip().lower()
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    if name in _NAMES:
        return _NAMES[name](num_classes, in_channels, image_size)
    for fam in _FAMILIES:
        m = re.fullmatch(fam.regex, name)
        if m:
            return fam.build(m.groups(), num_classes, in_channels, image_size)
    prefix, sep, rest = arch.strip().partition(":")
    if sep and prefix.lower() in _PREFIXES:
        return _PREFIXES[prefix.lower()][0](rest, num_classes, in_channels, image_size)
    raise UsageError(f"--arch '{arch}': unknown architecture; expected one of {arch_help()}")


#: Checks of prefixed names that need no build (a network's input size is not known yet).
_NAME_CHECKS: dict[str, Callable[[str], None]] = {}


def check_arch(arch: str) -> None:
    """Raise :class:`UsageError` now, before any data is loaded, when ``arch`` cannot be built
    (an unknown name, bad family parameters): builds it for two classes and drops it. Prefixed
    names registered with a ``check`` are only looked up (their input size is not known yet)."""
    _load()
    prefix, sep, rest = arch.strip().partition(":")
    if sep and prefix.lower() in _NAME_CHECKS:
        _NAME_CHECKS[prefix.lower()](rest)
        return
    build(arch, 2)


def param_count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def __getattr__(name: str) -> Any:
    # Classifier needs torch; importing the registry alone does not
    if name == "Classifier":
        from kdfine.models.base import Classifier

        return Classifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
