"""The ``relevance-finetune`` command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int | None``; the module is imported only when its subcommand runs. Errors from
the user's input (``ValueError``, ``TypeError``, ``OSError``, ``RuntimeError``; an error that a
data-loader worker raised, as its own message) and a broken install (``ImportError``, e.g. torch
and torchvision from different builds) print one line naming the problem; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Sequence

from ._version import __version__

__all__ = ["COMMANDS", "main"]

_DEBUG_HELP = "on an error, show the Python traceback instead of one line"
# Errors that bad input raises (missing files, unknown models, bad settings, unreadable weights).
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\s*Original Traceback")

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("relevance_finetune.bench.demo", "run the built-in spurious-background benchmark"),
    "train": ("relevance_finetune.train", "finetune a timm model with the relevance loss"),
    "export": ("relevance_finetune.export", "export a checkpoint as model.safetensors + config.json"),
    "evaluate": ("relevance_finetune.evaluate.command",
                 "robustness, segmentation, perturbation and shortcut tests; your own folders"),
    "masks": ("relevance_finetune.masks.command",
              "make foreground masks (TokenCut, or propagated from a few annotated ones)"),
    "explain": ("relevance_finetune.explain", "write relevance overlays for images"),
}


def _original_message(error: BaseException) -> str:
    """``error``'s message; for one that a DataLoader worker raised, the worker's own message (torch
    re-raises it as "Caught ValueError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(error)
    caught = _WORKER_ERROR.match(text)
    if caught is None:
        return text
    # the traceback ends with "[module.]ValueError: message" (after any chained exceptions)
    raised = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(caught[1])}: ", text, re.MULTILINE))
    return text[raised[-1].end():] if raised else text


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
            _import_command(module_name).add_arguments(sub)
    return parser


def _import_command(module_name: str):
    """Import a subcommand's module; torch and torchvision from different builds (torchvision's
    import fails with "operator torchvision::nms does not exist") raise an ``ImportError`` saying
    what to reinstall."""
    try:
        return importlib.import_module(module_name)
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        raise ImportError(
            f"torch and torchvision do not come from matching builds ({' '.join(str(error).split())}): reinstall "
            "them together, e.g. `pip install --force-reinstall torch torchvision` (from the same index, e.g. the "
            "same CUDA build)") from error


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    args = None
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return int(_import_command(COMMANDS[args.command][0]).run(args) or 0)
    except (ImportError, *_USER_ERRORS) as error:
        if args.debug if args is not None else "--debug" in argv:
            raise
        message = " ".join(_original_message(error).split()) or type(error).__name__
        print(f"relevance-finetune{' ' + command if command else ''}: error: {message} (--debug shows the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
