"""The ``relevance-finetune`` command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int | None``; the module is imported only when its subcommand runs. Errors from
the user's input (``ValueError``, ``TypeError``, ``OSError``, ``RuntimeError``) print one line
naming the problem; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ._version import __version__

__all__ = ["COMMANDS", "main"]

_DEBUG_HELP = "on an error, show the Python traceback instead of one line"
# Errors that bad input raises (missing files, unknown models, bad settings, unreadable weights).
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("relevance_finetune.bench.demo", "run the built-in spurious-background benchmark"),
    "train": ("relevance_finetune.train", "finetune a timm model with the relevance loss"),
    "export": ("relevance_finetune.export", "export a checkpoint as model.safetensors + config.json"),
    "evaluate": ("relevance_finetune.evaluate.command",
                 "robustness, segmentation, perturbation and shortcut tests; your own folders"),
    "masks": ("relevance_finetune.masks.command", "make foreground masks (TokenCut)"),
    "explain": ("relevance_finetune.explain", "write relevance overlays for images"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the arguments of ``command`` (if given) are filled in."""
    parser = argparse.ArgumentParser(
        prog="relevance-finetune",
        description="Finetune timm vision transformers so their relevance maps lie on the object "
                    "(RobustViT, Chefer et al., NeurIPS 2022).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except _USER_ERRORS as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"relevance-finetune {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
