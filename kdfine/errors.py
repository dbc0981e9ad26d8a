"""Exceptions that the CLI turns into one line on stderr and a documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_DEVICE = 4
EXIT_INTERRUPTED = 130


class KdfineError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = EXIT_INPUT


class InputError(KdfineError):
    """Bad input data or file: corrupt checkpoint, mismatched shapes, bad index list (exit 3)."""

    exit_code = EXIT_INPUT


class UsageError(KdfineError):
    """An option value that cannot work (exit 2, like Typer's own usage errors)."""

    exit_code = EXIT_USAGE


class ArgumentError(UsageError, TypeError):
    """A Python API function called with an argument of the wrong type (a usage error, and a
    TypeError as Python code expects)."""


def os_error(e: OSError) -> InputError:
    """The InputError (exit 3) for a file-system error that no reader turned into its own message:
    ``cannot access FILE: REASON``, as the CLI and the API both report it."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    return InputError(f"cannot access{where}: {e.strerror or e}")


class DeviceError(KdfineError):
    """The requested device is not available (exit 4)."""

    exit_code = EXIT_DEVICE


class Interrupted(KdfineError):
    """Training stopped by SIGINT/SIGTERM after saving its state (exit 130)."""

    exit_code = EXIT_INTERRUPTED


class KdfineWarning(UserWarning):
    """Something the user should know that does not stop the run (shown as one stderr line)."""
