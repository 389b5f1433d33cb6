"""``relevance-finetune explain``: relevance overlays and top-5 predictions for image files.

One overlay PNG per image, or with ``--compare CHECKPOINT`` one before/after grid (the paper's
Fig. 3) per batch of images, and ``predictions.json`` with the top-5 classes of each image.
Panels are titled with class names (the model's ``label_names``, else ImageNet's) and, where an
image's folder names its class (``<class>/<image>``, a class name or an ImageNet wnid), the true class.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset
from torch import nn

from .data import imagenet_class_index
from .gae import UnsupportedModelError, attach_gae, normalize_relevance, upsample_relevance
from .images import IMG_EXTENSIONS, model_data_config, read_image
from .models import (add_model_arguments, add_weights_arguments, create_model, load_weights,
                     merge_model_kwargs, unasked_random_weights)
from .viz import before_after_grid, denormalize, prediction_title, save_overlay

__all__ = [
    "ExplainError",
    "add_arguments",
    "class_names",
    "explain_images",
    "find_images",
    "run",
    "true_classes",
    "top_predictions",
]

TOP_K = 5


class ExplainError(Exception):
    """Bad input to ``explain``: reported as one line, without a traceback."""


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, directories searched recursively (sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
            if not found:
                raise ExplainError(f"no images ({', '.join(IMG_EXTENSIONS)}) in directory {item}")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise ExplainError(f"no such file or directory: {item}")
    return paths


def class_names(model: nn.Module) -> list[str] | None:
    """Class names by index: the model's ``label_names`` (e.g. the folder classes ``train``
    recorded), else the short names (``"tabby"``) of an ImageNet classifier (1k, 11k or 21k
    classes), else None."""
    label_names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    subset = infer_imagenet_subset(model)
    if subset is None:
        return list(label_names) if label_names and len(label_names) == model.num_classes else None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


def true_classes(paths: Sequence[Path], model: nn.Module) -> list[int | None]:
    """The class index of each image whose folder names one: a ``label_names`` entry of the
    model, or an ImageNet wnid for a 1k-class ImageNet model; None elsewhere."""
    label_names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ()
    folders = {name: index for index, name in enumerate(label_names)}
    if infer_imagenet_subset(model) == "imagenet-1k":
        folders.update(imagenet_class_index())
    return [folders.get(path.parent.name) for path in paths]


def top_predictions(logits: torch.Tensor, names: Sequence[str] | None, k: int = TOP_K) -> list[list[dict]]:
    """Per image, the top-``k`` classes as ``{"index", "label", "probability"}`` dicts."""
    probabilities, indices = logits.float().softmax(dim=1).topk(min(k, logits.shape[1]), dim=1)
    return [
        [{"index": int(i), "label": names[i] if names else str(int(i)), "probability": round(float(p), 6)}
         for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(probabilities, indices)
    ]


def _read(path: Path) -> Image.Image:
    try:
        return read_image(path)
    except ValueError as error:
        raise ExplainError(str(error)) from error


def _label(index: int, names: Sequence[str] | None) -> str:
    return names[index] if names else str(index)


def _title(top: list[dict], target: int | None, names: Sequence[str] | None, true: int | None) -> str:
    title = prediction_title(top[0]["label"], top[0]["probability"],
                             true_label=None if true is None else _label(true, names))
    if target is not None:
        title += f"; relevance for {_label(target, names)}"
    return title


def _explain_batch(
        model: nn.Module,
        batch: torch.Tensor,
        target: int | None,
        names: Sequence[str] | None,
) -> tuple[torch.Tensor, list[list[dict]]]:
    """Relevance maps (B, H, W) on the CPU and the top-5 predictions of ``model`` (in eval mode)
    for ``batch``, both from one forward."""
    with attach_gae(model) as gae:
        with torch.enable_grad():
            logits = model(batch)
        with torch.no_grad():
            raw = gae.relevance(logits, target)
    relevance = normalize_relevance(upsample_relevance(raw, batch.shape[-2:]))
    return relevance.cpu(), top_predictions(logits.detach(), names)


def explain_images(
        model: nn.Module,
        paths: Sequence[Path],
        out: Path,
        target: int | None = None,
        compare: nn.Module | None = None,
        batch_size: int = 6,
) -> list[dict]:
    """Write relevance pictures of ``paths`` into ``out`` and return one record per image.

    Without ``compare``: ``out/NNN_<stem>.png`` per image. With a second model of the same
    architecture: ``out/compare_NNN.png`` grids of up to ``batch_size`` images, ``model`` in the
    "original" row and ``compare`` in the "finetuned" row, each named by its own class names and
    true classes (its ``label_names`` may order the classes differently).
    """
    config = model_data_config(model)
    transform = create_transform(**config)
    names = class_names(model)
    names_after = None if compare is None else class_names(compare)
    device = next(model.parameters()).device
    records = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        truth = true_classes(chunk, model)
        batch = torch.stack([transform(_read(p)) for p in chunk]).to(device)
        shown = denormalize(batch, config).cpu()
        relevance, top = _explain_batch(model, batch, target, names)
        titles = [_title(t, target, names, true) for t, true in zip(top, truth)]
        if compare is None:
            known = [{} if true is None else {"true": {"index": true, "label": _label(true, names)}} for true in truth]
            files = [f"{start + i:03d}_{p.stem}.png" for i, p in enumerate(chunk)]
            for file, image, heat, title in zip(files, shown, relevance, titles):
                save_overlay(out / file, image, heat, title)
            records += [{"image": str(p), "overlay": f, "top5": t, **k} for p, f, t, k in zip(chunk, files, top, known)]
        else:
            truth_after = true_classes(chunk, compare)
            relevance_after, top_after = _explain_batch(compare, batch, target, names_after)
            file = f"compare_{start // batch_size:03d}.png"
            before_after_grid(shown, relevance, relevance_after, titles,
                              [_title(t, target, names_after, true) for t, true in zip(top_after, truth_after)],
                              out / file)
            known = [_compared_truth(true, names, after, names_after) for true, after in zip(truth, truth_after)]
            records += [{"image": str(p), "grid": file, "column": i, "top5": t, "top5_compare": ta, **k}
                        for i, (p, t, ta, k) in enumerate(zip(chunk, top, top_after, known))]
    return records


def _compared_truth(true: int | None, names: Sequence[str] | None, true_after: int | None,
                    names_after: Sequence[str] | None) -> dict:
    """``{"true": {"label", "index", "index_compare"}}`` of an image whose class either model knows
    (each index in that model's own order; one it does not know is left out), else ``{}``."""
    if true is None and true_after is None:
        return {}
    label = _label(true, names) if true is not None else _label(true_after, names_after)
    indices = {key: index for key, index in (("index", true), ("index_compare", true_after)) if index is not None}
    return {"true": {"label": label, **indices}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS",
                        help="image files, or directories searched recursively for images")
    parser.add_argument("--model", required=True, help="any timm.create_model name, local-dir:DIR or hf-hub:ORG/NAME")
    add_weights_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--compare", metavar="CHECKPOINT",
                        help="a second checkpoint of the same architecture: write before/after grids")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--target", type=int, metavar="CLASS", help="class index to explain (default: each image's prediction)")
    parser.add_argument("--batch-size", type=int, default=6, help="images per forward and per comparison grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")


def _load_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module | None]:
    try:
        model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                             random_weights=args.random_weights,
                             **merge_model_kwargs(args.model_kwargs, img_size=args.img_size))
        attach_gae(model).remove()  # fail now, before any image is read, if GAE cannot explain it
        compare = None
        if args.compare is not None:
            compare = load_weights(copy.deepcopy(model), args.compare).to(args.device).eval()
    except (UnsupportedModelError, ValueError, RuntimeError, OSError) as error:
        raise ExplainError(str(error)) from error
    return model.to(args.device).eval(), compare


def _check_target(target: int | None, model: nn.Module) -> None:
    classes = getattr(model, "num_classes", 0)
    if target is not None and not 0 <= target < classes:
        raise ExplainError(f"--target must be a class index in [0, {classes}), got {target}")


def run(args: argparse.Namespace) -> int:
    try:
        if args.batch_size < 1:
            raise ExplainError(f"--batch-size must be positive, got {args.batch_size}")
        paths = find_images(args.images)
        model, compare = _load_models(args)
        warning = unasked_random_weights(args.model, args.pretrained, args.checkpoint, args.random_weights)
        if warning:
            print(warning, file=sys.stderr)
        _check_target(args.target, model)
        args.out.mkdir(parents=True, exist_ok=True)
        records = explain_images(model, paths, args.out, args.target, compare, args.batch_size)
    except ExplainError as error:
        print(f"relevance-finetune explain: error: {error}", file=sys.stderr)
        return 1
    summary = {"model": args.model, "checkpoint": args.checkpoint, "compare": args.compare,
               "target": args.target, "images": records}
    (args.out / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"explained {len(records)} image(s): {args.out}")
    return 0
