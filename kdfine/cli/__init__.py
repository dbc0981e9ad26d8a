"""The ``kdfine`` command line: :mod:`kdfine.cli.app` (the Typer app, errors to exit codes, stdout
and stderr), :mod:`kdfine.cli.bridge` (option dataclasses to options), :mod:`kdfine.cli.commands`
(one function per subcommand: parse, call :mod:`kdfine.api`, print) and :mod:`kdfine.cli.render`
(all text for people). Torch-free at import.
"""

from kdfine.cli import commands  # noqa: F401  (registers the subcommands on the app)
from kdfine.cli.app import EXIT_BROKEN_PIPE, app, main

__all__ = ["app", "main", "EXIT_BROKEN_PIPE"]
