"""``relevance-finetune masks``: write TokenCut masks for an image folder.

Reads ``IMAGES/<class>/<name>.<ext>`` and writes ``OUT/<class>/<name>.png`` (0/255, the image's
size), the layout ``MaskedImageFolder(images=IMAGES, masks=OUT)`` reads. Resumable (existing
masks are skipped) and shardable (``--shard i/n``, or torchrun's RANK/WORLD_SIZE).
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from timm.data import resolve_model_data_config
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from ..data import list_images, model_input_size, read_image, write_mask
from ..models import add_model_arguments, create_model, merge_model_kwargs
from .tokencut import last_block_keys, tokencut_partition, upsample_mask

__all__ = ["add_arguments", "parse_shard", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["tokencut"], default="tokencut", help="mask method")
    parser.add_argument("--model", required=True,
                        help="timm model name (a DINO ViT such as vit_small_patch16_224.dino), "
                             "local-dir:DIR or hf-hub:ORG/NAME")
    parser.add_argument("--checkpoint", help="weights file (.safetensors or checkpoint) to load")
    parser.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights")
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, type=Path, help="folder of <class>/<name>.<ext> images")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <class>/<name>.png masks")
    parser.add_argument("--min-pixels", type=int, default=520,
                        help="skip masks with fewer foreground pixels (default: 520, as the reference)")
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


class _Images(Dataset):
    """Images resized to the model's input and normalised; a bad one yields its error message."""

    def __init__(self, paths: list[Path], size: tuple[int, int], config: dict) -> None:
        self.paths, self.size, self.config = paths, size, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int, str]:
        try:
            image = TF.pil_to_tensor(read_image(self.paths[index]))
        except (ValueError, FileNotFoundError) as error:
            return torch.zeros(3, *self.size), index, 0, 0, str(error)
        height, width = image.shape[-2:]
        image = TF.resize(image, list(self.size), InterpolationMode(self.config["interpolation"]), antialias=True)
        image = TF.normalize(image.float() / 255, list(self.config["mean"]), list(self.config["std"]))
        return image, index, height, width, ""


def run(args: argparse.Namespace) -> int:
    index, count = parse_shard(args.shard)
    tree = list_images(args.images)
    items = [(name, path) for name, paths in tree.items() for path in paths][index::count]
    if not items:
        raise ValueError(f"no images in {args.images} for shard {index}/{count}")
    targets = [args.out / name / f"{path.stem}.png" for name, path in items]
    todo = [i for i, target in enumerate(targets) if not target.exists()]

    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                         **merge_model_kwargs(args.model_kwargs, img_size=args.img_size))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    model = model.eval().to(device)
    config = resolve_model_data_config(model)
    loader = DataLoader(_Images([items[i][1] for i in todo], model_input_size(model), config),
                        batch_size=args.batch_size, num_workers=args.workers)
    written, small, bad = 0, 0, []
    with tqdm(total=len(todo), desc=f"tokencut {index}/{count}", unit="img") as progress:
        for images, positions, heights, widths, errors in loader:
            keys, grid = last_block_keys(model, images.to(device))
            for key, position, height, width, error in zip(keys.float().cpu(), positions, heights, widths, errors):
                if error:
                    if not args.skip_bad:
                        raise ValueError(error)
                    warnings.warn(f"skipping: {error}")
                    bad.append(error)
                    continue
                mask = upsample_mask(tokencut_partition(key, grid, args.tau, args.eps), (height, width))
                if mask.sum() < args.min_pixels:
                    small += 1
                    continue
                write_mask(mask, targets[todo[int(position)]])
                written += 1
            progress.update(len(positions))
    print(f"shard {index}/{count}: {written} masks written to {args.out}, {len(items) - len(todo)} already "
          f"there, {small} under --min-pixels {args.min_pixels}, {len(bad)} bad images skipped")
    return 0
