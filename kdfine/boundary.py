"""The Python API's boundary: arguments checked against the annotations, file-system errors as
kdfine's own.

:func:`api_function` wraps each public function of :mod:`kdfine.api`: a call with an argument of
the wrong type raises :class:`kdfine.errors.ArgumentError` (a UsageError and a TypeError) naming
the function, the argument and what it takes, before anything runs (``predict(m, "photos")``
with a string instead of a list of paths would otherwise search the folders "p", "h", ... and
"/"); an OSError that no reader turned into its own message comes out as the InputError the CLI
shows (``cannot access FILE: REASON``). Paths may be given as ``str`` or ``os.PathLike``
(``pathlib.Path``) and are passed on as ``str``; lists may be lists or tuples, never a bare string.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types
import typing
from typing import Any, Callable, TypeVar

from kdfine.errors import ArgumentError, os_error

F = TypeVar("F", bound=Callable[..., Any])


def api_function(fn: F) -> F:
    """Check ``fn``'s arguments at each call (see the module docstring) and translate OSError."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise ArgumentError(f"{fn.__name__}: {e}") from None
        for name, value in bound.arguments.items():
            if name in hints:
                bound.arguments[name] = checked(value, hints[name], f"{fn.__name__}: '{name}'")
        try:
            return fn(*bound.args, **bound.kwargs)
        except BrokenPipeError:
            raise  # the CLI's quiet exit 141
        except OSError as e:
            raise os_error(e) from e

    return typing.cast(F, wrapper)


def checked(value: Any, hint: Any, where: str) -> Any:
    """``value`` as ``hint`` wants it (a path as ``str``, a tuple as a list), or ArgumentError."""
    ok, out = _convert(value, hint)
    if not ok:
        hint_text = _describe(hint)
        fix = f"; pass [{value!r}]" if isinstance(value, (str, os.PathLike)) and "list" in hint_text else ""
        raise ArgumentError(f"{where} must be {hint_text}, got {type(value).__name__} {_short(value)}{fix}")
    return out


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _convert(value, arg)
            if ok:
                return True, out
        return False, None
    if hint is type(None):
        return value is None, value
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return _sequence(value, args[0] if args else Any)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        return isinstance(value, str), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return _integer(value)
    if hint is float:
        ok, out = _integer(value)
        return (True, float(out)) if ok else (isinstance(value, float), value)
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # an annotation this checker does not read: left to the function


def _sequence(value: Any, item: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, None
    out = []
    for v in value:
        ok, conv = _convert(v, item)
        if not ok:
            return False, None
        out.append(conv)
    return True, out


def _integer(value: Any) -> tuple[bool, Any]:
    if isinstance(value, bool):
        return False, None
    if isinstance(value, int):
        return True, value
    if hasattr(value, "dtype") and getattr(value, "ndim", None) == 0 and value.dtype.kind in "iu":
        return True, int(value)  # a numpy integer
    return False, None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, typing.Sequence):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}" if args else "a list"
    names = {str: "a str (or os.PathLike)", bool: "a bool", int: "an int", float: "a float", type(None): "None",
             dict: "a dict"}
    if hint in names:
        return names[hint]
    if dataclasses.is_dataclass(hint) or isinstance(hint, type):
        return f"a {hint.__name__}"
    return str(hint)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
