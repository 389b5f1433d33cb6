"""``relevance-finetune evaluate`` and the plumbing of the ``examples/table*.py`` scripts.

The command runs one suite for one or two sets of weights and writes ``<suite>.json`` and
``<suite>.md`` (the folder suite also its pictures); :func:`evaluate_grid` runs one suite for every
row of a paper table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .._files import write_text_atomic
from ..data import default_workers
from ..metrics import DEFAULT_FRACTIONS
from ..models import add_model_arguments, build_model, merge_model_kwargs
from .datasets import DATASETS, load_set_a
from .figures import write_folder_figures
from .folder import FolderSplit
from .report import folder_changes, suite_markdown
from .suites import PROTOCOLS, SUITES, EvalOptions, run_suite

__all__ = ["add_arguments", "add_data_arguments", "add_table_arguments", "evaluate_grid", "folder_splits",
           "options_from_args", "run", "table_models"]

def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Dataset and loader options shared by ``evaluate`` and the example scripts."""
    parser.add_argument("--data-root", default=None,
                        help="folder holding the datasets under their default names (see docs/reproduction.md)")
    parser.add_argument("--dataset-dir", action="append", default=[], metavar="NAME=PATH",
                        help=f"location of one dataset, overriding --data-root; NAME in {sorted(DATASETS)}")
    parser.add_argument("--protocol", choices=PROTOCOLS + ("both",), default="both",
                        help="robustness scoring protocol (default: both, each result says which); "
                             "segmentation: 'paper' normalises with mean = std = 0.5 as the reference, "
                             "otherwise with the model's own mean and std")
    parser.add_argument("--set-a", default=None, metavar="FILE",
                        help="wnids or class indices of the finetune's classes: results split into set A / set B")
    parser.add_argument("--si-score-labels", default=None, metavar="JSON",
                        help="{label string: ImageNet index} for SI-Score folders (default: matched to timm's names)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"data-loading worker processes (default: 4, or the CPUs this process may use if "
                             f"fewer: {default_workers()} here)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluate a seeded random subset of at most this many images per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _named_paths(items: Sequence[str], flag: str) -> dict[str, str]:
    """``NAME=PATH`` items of ``flag`` as a dict; ``ValueError`` on a malformed or repeated name."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in named:
            raise ValueError(f"{flag} expects NAME=PATH with a new NAME each time, got {item!r}")
        named[name] = path
    return named


def folder_splits(args: argparse.Namespace) -> dict[str, FolderSplit]:
    """The folder suite's splits from ``--split NAME=DIR`` and ``--split-masks NAME=DIR``."""
    images = _named_paths(getattr(args, "split", None) or [], "--split")
    masks = _named_paths(getattr(args, "split_masks", None) or [], "--split-masks")
    unknown = sorted(set(masks) - set(images))
    if unknown:
        raise ValueError(f"--split-masks names {unknown}, which no --split names (splits: {sorted(images)})")
    skip = bool(getattr(args, "skip_unmasked", False))
    groups = getattr(args, "groups", None)
    return {name: FolderSplit(path, masks.get(name), skip, groups) for name, path in images.items()}


def options_from_args(args: argparse.Namespace, datasets: Sequence[str] | None = None) -> EvalOptions:
    """:class:`EvalOptions` from the flags of :func:`add_data_arguments` (and ``--fractions``)."""
    dirs = {}
    for item in args.dataset_dir:
        name, sep, path = item.partition("=")
        if not sep or name not in DATASETS:
            raise ValueError(f"--dataset-dir expects NAME=PATH with NAME in {sorted(DATASETS)}, got {item!r}")
        dirs[name] = path
    return EvalOptions(
        data_root=args.data_root, dataset_dirs=dirs, datasets=datasets,
        protocols=PROTOCOLS if args.protocol == "both" else (args.protocol,),
        set_a=load_set_a(args.set_a) if args.set_a else None,
        si_labels=json.loads(Path(args.si_score_labels).read_text()) if args.si_score_labels else None,
        fractions=tuple(getattr(args, "fractions", None) or DEFAULT_FRACTIONS),
        batch_size=args.batch_size, num_workers=args.workers, max_images=args.max_images,
        seed=args.seed, progress=not args.no_progress, splits=folder_splits(args),
        skip_bad=bool(getattr(args, "skip_bad", False)))


def add_table_arguments(parser: argparse.ArgumentParser, models: Mapping[str, str | None]) -> None:
    """Arguments of the ``examples/table*.py`` scripts: checkpoints, model names, output, data."""
    parser.add_argument("--checkpoints", default="checkpoints",
                        help="finetuned weights as CHECKPOINTS/<model>/<method>/model.safetensors")
    parser.add_argument("--model-name", action="append", default=[], metavar="MODEL=NAME",
                        help=f"timm name for a table's model (defaults: {dict(models)})")
    parser.add_argument("--only", nargs="+", default=None, metavar="MODEL", choices=list(models),
                        help="evaluate only these of the table's models")
    parser.add_argument("--out", required=True, help="markdown file to write (JSON next to it)")
    add_data_arguments(parser)


def table_models(args: argparse.Namespace, models: Mapping[str, str | None]) -> dict[str, str | None]:
    """The table's model names with ``--model-name MODEL=NAME`` overrides, restricted to ``--only``."""
    names = dict(models)
    for item in args.model_name:
        key, sep, name = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--model-name expects MODEL=NAME with MODEL in {list(names)}, got {item!r}")
        names[key] = name
    return {key: name for key, name in names.items() if args.only is None or key in args.only}


def evaluate_grid(
        grid: Sequence[tuple[Sequence[str], str | None, str | Path | None]],
        suite: str,
        options: EvalOptions,
        device: str | torch.device = "cpu",
) -> list[tuple[tuple[str, ...], dict[str, Any] | None]]:
    """Evaluate every ``(label cells, model name, checkpoint)`` row of a paper table.

    A row without a model name, or whose checkpoint does not exist, is reported and yields
    ``None`` (shown as "-"), so a table fills in as the finetunes finish.
    """
    rows = []
    for labels, name, checkpoint in grid:
        if name is None or (checkpoint is not None and not Path(checkpoint).exists()):
            print(f"skipping {' / '.join(labels)}: " + (
                "no model name given" if name is None else f"no checkpoint at {checkpoint}"))
            rows.append((tuple(labels), None))
            continue
        model = build_model(name, checkpoint, device)
        rows.append((tuple(labels), run_suite(model, suite, options)))
        del model
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``relevance-finetune evaluate``."""
    parser.add_argument("--model", required=True,
                        help="any timm.create_model name, local-dir:DIR or hf-hub:ORG/NAME")
    parser.add_argument("--checkpoint", default=None, help="weights to load (.safetensors, checkpoint, or export dir)")
    add_model_arguments(parser)
    parser.add_argument("--compare", default=None, metavar="PATH",
                        help="second weights for the same model: before/after columns")
    parser.add_argument("--labels", nargs=2, default=("before", "after"), metavar=("BEFORE", "AFTER"),
                        help="column names for --checkpoint and --compare")
    parser.add_argument("--suite", choices=SUITES, default="robustness")
    parser.add_argument("--datasets", nargs="+", default=None, choices=sorted(DATASETS), metavar="NAME",
                        help="robustness/perturbation/shortcuts datasets (default: every set of the suite "
                             "present; perturbation: imagenet)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="perturbation: shares of pixels removed (default 0.1 .. 0.9)")
    parser.add_argument("--split", action="append", default=[], metavar="NAME=DIR",
                        help="folder suite: a split of your own images as DIR/<class>/<image> (repeat: e.g. "
                             "id=data/val ood_night=data/night)")
    parser.add_argument("--split-masks", action="append", default=[], metavar="NAME=DIR",
                        help="folder suite: masks of split NAME as DIR/<class>/<stem>.png (adds the reliance "
                             "probes and the relevance localisation)")
    parser.add_argument("--skip-unmasked", action="store_true",
                        help="folder suite: leave out the images of a masked split that have no mask (e.g. "
                             "TokenCut made none) instead of stopping; the report counts them")
    parser.add_argument("--groups", default=None, metavar="FILE",
                        help="folder suite: a CSV path,group giving each image (<class>/<image>, relative to its "
                             "split's DIR) a group id or name: adds per-group and worst-group accuracy")
    parser.add_argument("--skip-bad", action="store_true",
                        help="waterbirds suite: leave out test images whose file is missing instead of stopping")
    parser.add_argument("--out", required=True, help="output folder for <suite>.json and <suite>.md")
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``relevance-finetune evaluate``."""
    options = options_from_args(args, args.datasets)
    if args.groups is not None and args.suite != "folder":
        raise ValueError("--groups is read by --suite folder only (the waterbirds suite has its own groups)")
    if (args.suite == "folder") != bool(options.splits):
        raise ValueError("--suite folder needs --split NAME=DIR (your <class>/<image> folders)"
                         if args.suite == "folder" else "--split and --split-masks are read by --suite folder only")
    weights = {args.labels[0]: args.checkpoint}
    if args.compare:
        weights[args.labels[1]] = args.compare
    runs = {}
    for label, checkpoint in weights.items():
        model = build_model(args.model, checkpoint, args.device,
                            **merge_model_kwargs(args.model_kwargs, img_size=args.img_size))
        runs[label] = run_suite(model, args.suite, options)
        del model
    out = Path(args.out)
    report = {"suite": args.suite, "model": args.model, "protocols": list(options.protocols),
              "set_a": args.set_a, "weights": weights, "runs": runs}
    if args.suite == "folder" and len(runs) == 2:
        report["change"] = folder_changes(runs)
    if args.suite == "waterbirds":  # the --checkpoint weights' numbers at the top, as scripts read them
        report.update(runs[args.labels[0]])
    write_text_atomic(out / f"{args.suite}.json", json.dumps(report, indent=2))
    markdown = f"## {args.suite}: {args.model}\n\n" + suite_markdown(
        args.suite, runs, options.protocols, options.set_a is not None)
    write_text_atomic(out / f"{args.suite}.md", markdown)
    print(markdown)
    if args.suite == "folder":
        for path in write_folder_figures(runs, out):
            print(f"wrote {path}")
    return 0
