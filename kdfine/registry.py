"""Names registered where they are defined, as timm registers its models.

A module that implements named things (losses, detectors, training strategies) creates a
:class:`Registry` and decorates each implementation with ``@REGISTRY.register("name")``. The
command line needs the names before anything heavy is imported (``kdfine detect-noise`` never
loads torch, yet ``--loss`` lists the losses, which need torch): :func:`declared_names` reads them
from the defining module's source without importing it, and a test checks that it finds exactly
what the imported registry holds.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one kind (``what``, for messages), in registration order; each may
    carry keyword ``info`` (e.g. which inputs a detector needs)."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._items[name], self.info[name] = obj, info
            return obj

        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def get(self, name: str) -> T:
        """The implementation called ``name``; ValueError naming the known ones otherwise (the
        options were validated at the boundary: this is a caller's bug or a library user's typo)."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; expected one of {', '.join(self._items)}") from None

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


@functools.lru_cache(maxsize=None)  # each option's validation asks again; a parse costs 10-30 ms
def declared_names(module: str, registry: str) -> tuple[str, ...]:
    """The names that the kdfine module ``module`` registers with ``@<registry>.register("name", ...)``,
    in source order, read from its source file without importing it or its packages."""
    top, _, rest = module.partition(".")
    path = Path(__file__).resolve().parent.joinpath(*rest.split(".")).with_suffix(".py")
    if top != "kdfine" or not path.is_file():
        raise ModuleNotFoundError(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register"
                        and isinstance(d.func.value, ast.Name) and d.func.value.id == registry
                        and d.args and isinstance(d.args[0], ast.Constant)):
                    names.append((node.lineno, d.args[0].value))
    return tuple(n for _, n in sorted(names))
