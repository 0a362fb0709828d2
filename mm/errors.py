"""User-facing errors and the one wrapper every command line uses to report them."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A problem with the user's input (file, config, argument): reported in one line, no traceback."""


class ConfigError(UserError):
    """An unknown key, a value of the wrong type or a missing required value in a config."""


class DataError(UserError):
    """Unusable data: no shards, too many corrupt samples, a label outside the class list."""


def _one_line(e: Exception) -> str:
    """The user's message, also when torch's DataLoader re-raised it wrapped in a worker traceback."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("mm.errors.") else last
    return text.replace("\n", " ")


def cli_main(fn: F) -> F:
    """Run a command's main(): a UserError prints `error: ...` on one line and exits with 2.

    `--debug` anywhere in argv (or MM_DEBUG=1) re-raises so the traceback is shown.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = "--debug" in sys.argv or os.environ.get("MM_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
