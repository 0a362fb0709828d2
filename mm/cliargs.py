"""Argument helpers shared by every `mm` sub-command (and their old `mm-*` aliases)."""

from __future__ import annotations

import argparse


def command_prog(name: str) -> str:
    """The program name a sub-command's usage line shows."""
    return f"mm {name}"


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def add_config_options(parser: argparse.ArgumentParser, example: str, required: bool = True) -> None:
    """--config FILE and repeatable --set KEY=VALUE overrides (mm.config.load_config)."""
    parser.add_argument("--config", required=required, help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")
