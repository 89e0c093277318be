"""The ``moekit`` command. Thin: each subcommand lives in a module of this package that exposes
``register(subparsers)`` and calls library functions (`moekit.train`, `moekit.recipes`,
`moekit.analysis`); a module whose optional dependency is missing contributes nothing, with a note.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

_COMMAND_MODULES = ["moekit.cli.train", "moekit.cli.recipes"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts for PyTorch.")
    from moekit import __version__

    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            # A command module whose optional dependency is missing contributes nothing, with a note.
            print(f"moekit: commands of {name} unavailable: {e}", file=sys.stderr)
            continue
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    # TypeError: a setting of the wrong kind (`--set train.steps=true`); OSError: a missing file,
    # no space left, permissions.
    except (ValueError, TypeError, OSError) as e:
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
