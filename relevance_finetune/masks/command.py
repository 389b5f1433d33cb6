"""``relevance-finetune masks``: write TokenCut masks for an image folder.

Reads ``IMAGES/<class>/<name>.<ext>`` and writes ``OUT/<class>/<name>.png`` (0/255, the image's
size), the layout ``MaskedImageFolder(images=IMAGES, masks=OUT)`` reads. The masks are refined
with the bilateral solver by default, then filtered by size. Resumable (existing masks are
skipped) and shardable (``--shard i/n``, or torchrun's RANK/WORLD_SIZE).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import resolve_model_data_config
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from ..images import list_images, model_input_size, read_image, write_mask
from ..models import (add_model_arguments, add_weights_arguments, create_model, merge_model_kwargs,
                      unasked_random_weights)
from .bilateral import bilateral_refine
from .tokencut import last_block_keys, tokencut_partition, upsample_mask

__all__ = ["add_arguments", "parse_shard", "patch_multiple_size", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["tokencut"], default="tokencut", help="mask method")
    parser.add_argument("--model", required=True,
                        help="timm model name (a DINO ViT such as vit_small_patch16_224.dino), "
                             "local-dir:DIR or hf-hub:ORG/NAME")
    add_weights_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, type=Path, help="folder of <class>/<name>.<ext> images")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <class>/<name>.png masks")
    parser.add_argument("--refine", choices=["bilateral", "none"], default="bilateral",
                        help="bilateral: refine with TokenCut's bilateral solver and drop masks that then "
                             "overlap the coarse one with IoU < 0.5 (default, the paper's masks); none: "
                             "the patch-grid masks")
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
    parser.add_argument("--workers", type=int, default=4, help="data loading processes")
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


def patch_multiple_size(height: int, width: int, patch: tuple[int, int],
                        short_side: int | None = None) -> tuple[int, int]:
    """TokenCut's input size (H, W): each side rounded to the nearest multiple of the patch size
    (at least one patch), after scaling the short side to ``short_side`` if given."""
    scale = short_side / min(height, width) if short_side else 1
    return tuple(max(1, round(side * scale / step)) * step for side, step in zip((height, width), patch))


class _Item(NamedTuple):
    image: torch.Tensor  # (3, h, w) normalised model input
    original: np.ndarray | None  # (H, W, 3) uint8, kept for the refinement
    index: int
    size: tuple[int, int]  # (H, W) of the original image
    error: str  # why the image could not be read, or ""


class _Images(Dataset):
    """Images resized for the model and normalised; a bad one yields its error message.

    ``size`` None resizes each image to :func:`patch_multiple_size` for ``patch`` (Lanczos, as
    TokenCut); ``keep_original`` keeps the RGB image for the refinement.
    """

    def __init__(self, paths: list[Path], config: dict, size: tuple[int, int] | None,
                 patch: tuple[int, int] | None, short_side: int | None, keep_original: bool) -> None:
        self.paths, self.config, self.size, self.patch = paths, config, size, patch
        self.short_side, self.keep_original = short_side, keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        try:
            pil = read_image(self.paths[index])
        except (ValueError, FileNotFoundError) as error:
            return _Item(torch.zeros(0), None, index, (0, 0), str(error))
        original = np.asarray(pil) if self.keep_original else None
        if self.size is None:
            height, width = patch_multiple_size(pil.height, pil.width, self.patch, self.short_side)
            image = TF.pil_to_tensor(pil.resize((width, height), Image.Resampling.LANCZOS))
        else:
            image = TF.resize(TF.pil_to_tensor(pil), list(self.size), InterpolationMode(self.config["interpolation"]),
                              antialias=True)
        image = TF.normalize(image.float() / 255, list(self.config["mean"]), list(self.config["std"]))
        return _Item(image, original, index, (pil.height, pil.width), "")


def _as_list(batch: list[_Item]) -> list[_Item]:
    return batch


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
    index, count = parse_shard(args.shard)
    if args.short_side is not None and (args.resize != "aspect" or args.short_side < 1):
        raise ValueError("--short-side takes a positive size and needs --resize aspect")
    tree = list_images(args.images)
    items = [(name, path) for name, paths in tree.items() for path in paths][index::count]
    if not items:
        raise ValueError(f"no images in {args.images} for shard {index}/{count}")
    targets = [args.out / name / f"{path.stem}.png" for name, path in items]
    todo = [i for i, target in enumerate(targets) if not target.exists()]

    model = _create_model(args)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    model = model.eval().to(device)
    size = model_input_size(model) if args.resize == "model" else None
    patch = tuple(model.patch_embed.patch_size) if size is None else None
    dataset = _Images([items[i][1] for i in todo], resolve_model_data_config(model), size, patch,
                      args.short_side, args.refine == "bilateral")
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_as_list)
    written, dropped, small, bad = 0, 0, 0, []
    with tqdm(total=len(todo), desc=f"tokencut {index}/{count}", unit="img") as progress:
        for batch in loader:
            by_shape: dict[tuple[int, ...], list[_Item]] = {}  # one forward per input size
            for item in batch:
                if not item.error:
                    by_shape.setdefault(tuple(item.image.shape), []).append(item)
                elif args.skip_bad:
                    warnings.warn(f"skipping: {item.error}")
                    bad.append(item.error)
                else:
                    raise ValueError(item.error)
            for group in by_shape.values():
                keys, grid = last_block_keys(model, torch.stack([item.image for item in group]).to(device))
                for key, item in zip(keys.float().cpu(), group):
                    mask = upsample_mask(tokencut_partition(key, grid, args.tau, args.eps), item.size)
                    if args.refine == "bilateral":
                        mask = bilateral_refine(item.original, mask, component=args.component)
                    if mask is None:
                        dropped += 1
                    elif mask.sum() < args.min_pixels:
                        small += 1
                    else:
                        write_mask(mask, targets[todo[item.index]])
                        written += 1
            progress.update(len(batch))
    print(f"shard {index}/{count}: {written} masks written to {args.out}, {len(items) - len(todo)} already "
          f"there, {dropped} dropped by the refinement (IoU < 0.5), {small} under --min-pixels "
          f"{args.min_pixels}, {len(bad)} bad images skipped")
    return 0
