"""``relevance-finetune masks``: write masks for an image folder, by TokenCut or propagated from a few.

Reads ``IMAGES/<class>/<name>.<ext>`` and writes ``OUT/<class>/<name>.png`` (0/255, the image's
size), the layout ``MaskedImageFolder(images=IMAGES, masks=OUT)`` reads, and ``OUT/preview.png``.
``--method tokencut`` (default): refined with the bilateral solver by default, then filtered by
size; shardable (``--shard i/n``, or torchrun's RANK/WORLD_SIZE). ``--method propagate --from
MASKS``: the few annotated masks in MASKS (``<class>/<name>.png``) propagated to every image on the
model's patch tokens (``propagate_folder.py``), with ``OUT/summary.json``; under torchrun the
processes share the images. Both resumable: existing masks are skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import default_workers
from ..images import list_images
from ..models import (add_model_arguments, add_weights_arguments, create_model, merge_model_kwargs,
                      unasked_random_weights)
from .automatic import TokenCutOptions, write_tokencut_masks
from .preview import write_preview
from .propagate import LOW_IOU
from .propagate_folder import PropagationOptions, propagate_folder

__all__ = ["add_arguments", "parse_shard", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["tokencut", "propagate"], default="tokencut",
                        help="tokencut: unsupervised (default); propagate: from a few annotated masks (--from)")
    parser.add_argument("--model", required=True,
                        help="timm model name (for TokenCut a DINO ViT such as vit_small_patch16_224.dino; for "
                             "propagate the model to correct, or any ViT), local-dir:DIR or hf-hub:ORG/NAME")
    add_weights_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, type=Path, help="folder of <class>/<name>.<ext> images")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <class>/<name>.png masks")
    parser.add_argument("--from", dest="from_masks", type=Path,
                        help="propagate: the folder of the annotated masks, <class>/<name>.png as their images "
                             "in --images (at least one per class)")
    parser.add_argument("--refine", choices=["bilateral", "none"],
                        help="tokencut: bilateral refines with TokenCut's bilateral solver and drops masks that "
                             "then overlap the coarse one with IoU < 0.5 (default, the paper's masks), none keeps "
                             "the patch-grid masks; propagate: bilateral smooths each probability map on its "
                             "image, none (default) does not")
    parser.add_argument("--folds", type=int, default=3,
                        help="propagate: cross-validation folds, split by image, that choose the classifier and "
                             "measure the held-out IoU (default: 3)")
    parser.add_argument("--warn-below", type=float, default=LOW_IOU,
                        help=f"propagate: warn when the held-out IoU is below this (default: {LOW_IOU})")
    parser.add_argument("--seed", type=int, default=0, help="propagate: seed of the folds and the classifier")
    parser.add_argument("--component", choices=["reference", "largest"], default="reference",
                        help="component the refinement keeps: TokenCut's rule (default) or the largest object")
    parser.add_argument("--resize", choices=["model", "aspect"], default="model",
                        help="model: the model's input size (default); aspect: TokenCut's, each side to the "
                             "nearest multiple of the patch size (needs a model with dynamic_img_size)")
    parser.add_argument("--short-side", type=int,
                        help="with --resize aspect: first scale the short side to this (default: keep the "
                             "image's size, as TokenCut)")
    parser.add_argument("--min-pixels", type=int, default=520,
                        help="skip masks with fewer foreground pixels, counted after refinement "
                             "(default: 520, as the reference)")
    parser.add_argument("--tau", type=float, default=0.2, help="affinity threshold (default: 0.2)")
    parser.add_argument("--eps", type=float, default=1e-5, help="weight of non-edges (default: 1e-5)")
    parser.add_argument("--shard", help="i/n: process the i-th of n shards (default: RANK/WORLD_SIZE or 0/1)")
    parser.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"data loading processes (default: 4, or the CPUs this process may use if fewer: "
                             f"{default_workers()} here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``'i/n'`` -> (i, n); None -> torchrun's (RANK, WORLD_SIZE), or (0, 1)."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {shard}: need 0 <= i < n")
    return index, count


def _create_model(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = merge_model_kwargs(args.model_kwargs, img_size=args.img_size)
    if args.resize == "aspect":
        kwargs["dynamic_img_size"] = True
    try:
        model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                             random_weights=args.random_weights, **kwargs)
    except (TypeError, ValueError) as error:  # the model's constructor, or create_model's message about it
        if "dynamic_img_size" not in str(error):
            raise
        raise ValueError(f"--resize aspect needs a model that takes dynamic_img_size=True; {args.model} "
                         "does not (use --resize model)") from error
    warning = unasked_random_weights(args.model, args.pretrained, args.checkpoint, args.random_weights)
    if warning:
        print(warning, file=sys.stderr)
    return model


def run(args: argparse.Namespace) -> int:
    if args.method == "propagate":
        return _propagate(args)
    if args.from_masks is not None:
        raise ValueError("--from names the annotated masks of --method propagate; TokenCut needs none")
    args.refine = args.refine or "bilateral"
    index, count = parse_shard(args.shard)
    if args.short_side is not None and (args.resize != "aspect" or args.short_side < 1):
        raise ValueError("--short-side takes a positive size and needs --resize aspect")
    tree = list_images(args.images)
    items = [(name, path) for name, paths in tree.items() for path in paths][index::count]
    if not items:
        raise ValueError(f"no images in {args.images} for shard {index}/{count}")
    targets = [args.out / name / f"{path.stem}.png" for name, path in items]
    todo = [i for i, target in enumerate(targets) if not target.exists()]

    model, device = _model_on_device(args)
    options = TokenCutOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TokenCutOptions)})
    counts = write_tokencut_masks(model, [items[i][1] for i in todo], [targets[i] for i in todo], device, options,
                                  desc=f"tokencut {index}/{count}")
    print(f"shard {index}/{count}: {counts.written} masks written to {args.out}, {len(items) - len(todo)} already "
          f"there, {counts.dropped} dropped by the refinement (IoU < 0.5), {counts.small} under --min-pixels "
          f"{args.min_pixels}, {len(counts.bad)} bad images skipped")
    print(f"a sample of the masks, outlined: {write_preview(args.images, args.out)}")
    return 0


def _model_on_device(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device]:
    """The model of ``--model``, in eval mode, on ``--device`` (torchrun's ``cuda:LOCAL_RANK`` for ``cuda``)."""
    model = _create_model(args)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    return model.eval().to(device), device


def _propagate(args: argparse.Namespace) -> int:
    """``--method propagate``: every image's mask from the annotated ones; under torchrun, shared out."""
    if args.from_masks is None:
        raise ValueError("--method propagate needs --from MASKS: a folder of a few annotated masks, "
                         "<class>/<name>.png as their images in --images")
    if args.shard is not None or args.resize != "model":
        raise ValueError("--shard and --resize are TokenCut's; propagation reads the images at the model's input "
                         "size and shares them out itself under torchrun")
    started = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if started:  # the processes fit the same classifier, then each masks its share
        dist.init_process_group("gloo")
    try:
        model, device = _model_on_device(args)
        options = PropagationOptions(refine=args.refine == "bilateral", folds=args.folds, seed=args.seed,
                                     warn_below=args.warn_below, batch_size=args.batch_size, workers=args.workers,
                                     skip_bad=args.skip_bad)
        summary = propagate_folder(args.from_masks, args.images, args.out, model, args.model, device, options)
    finally:
        if started:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{summary['images']} images: {summary['annotated']} annotated masks copied, {summary['predicted']} "
              f"propagated, {summary['empty']} left without a mask (empty), {summary['whole']} covering the whole "
              f"image; held-out IoU {summary['held_out_iou']:.2f}; counts in {args.out / 'summary.json'}, a sample "
              f"outlined in {args.out / 'preview.png'}")
    return 0
