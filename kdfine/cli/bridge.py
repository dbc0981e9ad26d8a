"""The bridge from the option dataclasses of :mod:`kdfine.options` to command-line options.

``@takes("distill", data=DataOptions, cfg=TrainConfig)`` gives a command every field of those
classes that the command takes (their :class:`~kdfine.options.Flag` says which), with the flag,
help, panel, choices, completion and default declared there, and calls the command with
``data=DataOptions(...)`` and ``cfg=TrainConfig(...)``. The options that belong to the command
line alone (``--device``, ``--json``, ...) are declared below, once.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable, Literal, Optional

import typer

from kdfine.options import P_DEVICE, P_OUT, P_TRAIN, Flag, declarations

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.",
                                        rich_help_panel=P_DEVICE)]
LogOpt = Annotated[Optional[str], typer.Option("--log", help="Write one JSON line per epoch to this file.",
                                               rich_help_panel=P_OUT)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the state saved beside --out after "
                                         "every epoch.", rich_help_panel=P_TRAIN)]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --resume: accept options that differ from the "
                                        "recorded ones.", rich_help_panel=P_TRAIN)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead.",
                                       rich_help_panel=P_OUT)]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or summaries on stderr (errors still).",
                                        rich_help_panel=P_OUT)]
NoisyOutOpt = Annotated[Optional[str], typer.Option("--noisy-out", help="Also write the rejected samples as CSV "
                                                    "(the columns of --out).",
                                                    rich_help_panel=P_OUT)]
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="Architecture: a built-in name or family, tv:NAME (torchvision) or timm:NAME; `kdfine list-archs` "
                   "lists them. Default: by image size (under 64 px a small CNN, else a torchvision network).",
    rich_help_panel=P_TRAIN)]


def option_param(name: str, meta: Flag, hint: Any, default: Any, command: str) -> inspect.Parameter:
    """A command parameter declared by the metadata of an option-dataclass field."""
    typ = hint
    choices = meta.choices_for(command)
    if choices is not None:
        typ = Literal[tuple(choices)]  # Typer shows, completes and checks the library's own list
        if type(None) in typing.get_args(hint):
            typ = Optional[typ]
    decls = [meta.flag] + ([meta.short] if meta.short else [])
    complete = None if meta.completions is None else (
        lambda incomplete: [v for v in meta.completions() if v.startswith(incomplete)])
    info = typer.Option(*decls, help=meta.help_for(command), rich_help_panel=meta.panel, autocompletion=complete)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[typ, info])


def takes(command: str, **groups: type) -> Callable:
    """Add the fields of option dataclasses that ``command`` takes to the command (see the module
    docstring); a field's command-line default is its per-command default where it declares one."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for n, p in sig.parameters.items() if n not in groups]
        added: dict[str, str] = {}  # parameter name -> group
        params = []
        for group, cls in groups.items():
            for f, meta, hint in declarations(cls, command):
                if meta.flag is None:
                    continue
                if f.name in added or any(p.name == f.name for p in own):
                    raise TypeError(f"{fn.__name__}: option {f.name} declared twice")
                added[f.name] = group
                params.append(option_param(f.name, meta, hint, meta.default_for(command, f.default), command))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values: dict[str, dict[str, Any]] = {g: {} for g in groups}
            for name, group in added.items():
                values[group][name] = kwargs.pop(name)
            for group, cls in groups.items():
                kwargs[group] = cls(**values[group])
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + params)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + params}
        return wrapper

    return decorate


def fields_of(cls: type, command: str) -> list[str]:
    """The names of the fields of ``cls`` that ``command`` offers on its command line."""
    return [f.name for f, meta, _ in declarations(cls, command) if meta.flag is not None]


__all__ = ["takes", "option_param", "fields_of", "DeviceOpt", "LogOpt", "ResumeOpt", "ForceOpt", "JsonOpt",
           "QuietOpt", "NoisyOutOpt", "ArchOpt"]
