"""User-facing errors and the one wrapper every command line uses to report them."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A problem with the user's input (file, config, argument): reported in one line, no traceback."""


class ConfigError(UserError):
    """An unknown key, a value of the wrong type or a missing required value in a config."""


class DataError(UserError):
    """Unusable data: no shards, too many corrupt samples, a label outside the class list."""


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """Fail before any compute when `path` could not be written: it is a folder, or the nearest existing
    folder above it is a file or is not writable. Creates nothing."""
    if Path(path).is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name, e.g. {Path(path) / 'result.json'}")
    existing = Path(path).absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path}: cannot write there ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{option} {path}: cannot write there ({existing} is not writable)")


def write_text_atomic(path: str | os.PathLike, text: str, announce: str | None = None) -> None:
    """Write a text file whole or not at all (a temporary name, synced, then a rename), so a run stopped
    half-way never leaves a truncated result, config or checkpoint marker that looks complete.

    With `announce` (the option that named the file, e.g. '--output'), replacing an existing file is
    said on stderr: a user's earlier result is never overwritten silently."""
    path = Path(path)
    if announce and path.exists():
        print(f"{announce}: replacing {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a checkpoint's "latest" marker must not outlive the files it names
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a folder at `path` must not leave the .tmp behind
        raise


def _one_line(e: Exception) -> str:
    """The user's message, also when torch's DataLoader re-raised it wrapped in a worker traceback."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith("mm.errors.") else last
    return text.replace("\n", " ")


def cli_main(fn: F) -> F:
    """Run a command's main(): a UserError prints `error: ...` on one line and exits with 2.

    An OSError that reaches the top names a file the user gave (a folder that is a file, a full disk,
    no permission) and is reported the same way. `--debug` anywhere in argv (or MM_DEBUG=1) re-raises
    so the traceback is shown.
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
        except OSError as e:
            if debug or e.filename is None:
                raise
            print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
