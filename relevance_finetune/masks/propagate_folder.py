"""Propagated masks of an image folder: every image of ``IMAGES/<class>/<name>.<ext>`` gets a mask
from the few annotated ones under ``MASKS/<class>/<name>.png``, written as ``OUT/<class>/<name>.png``.

:func:`propagate_folder` is the work of ``relevance-finetune masks --method propagate``;
:func:`propagated_masks` is what ``train --masks propagate:MASKS`` makes of it, with the model being
trained as the source of the tokens. The annotated images keep their own masks (copied); every
other image gets the mask :func:`~relevance_finetune.masks.propagate_masks` predicts at the model's
input size, upsampled to the image's own size. As TokenCut's masks (``automatic.py``), the masks
are written atomically, made once (a rerun makes only the missing ones), split across
``torch.distributed`` processes (each fits the same seeded classifier, then masks every n-th
image), summed up in ``summary.json`` and shown in ``preview.png``.

A predicted mask without an object pixel is not written: its image counts as *empty* and is left
out of training (``unmasked`` in the summary), as TokenCut's empty masks are.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from .._files import write_text_atomic
from ..images import list_images, model_input_size, read_binary_mask, write_mask
from .automatic import FULL_SHARE, SUMMARY, _as_list, _gather, _Images, _world, recorded_summary
from .preview import write_preview
from .propagate import LOW_IOU, Propagation, patch_tokens, propagate_masks

__all__ = ["PREFIX", "PropagationOptions", "propagate_folder", "propagated_masks"]

PREFIX = "propagate:"  # --masks propagate:MASKS
_SOURCE_KEYS = ("method", "from", "model", "settings")  # what made the masks: a rerun must match them
_FIT_KEYS = ("held_out_iou", "fold_iou", "blocks", "classifier", "threshold", "scores", "seconds")
_COUNTS = ("images", "annotated", "predicted", "empty", "whole")  # of summary.json, overall and per class

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PropagationOptions:
    """The settings of ``relevance-finetune masks --method propagate`` (its flags; these are its defaults).

    ``refine``, ``folds`` and ``seed`` make the masks (``propagate_masks``'s arguments) and are recorded;
    ``warn_below`` is the held-out IoU under which a warning is given.
    """

    refine: bool = False
    folds: int = 3
    seed: int = 0
    warn_below: float = LOW_IOU
    batch_size: int = 16
    workers: int = 4
    skip_bad: bool = False

    def settings(self) -> dict[str, Any]:
        """The settings that make the masks (a rerun into the same folder must keep them)."""
        return {"refine": self.refine, "folds": self.folds, "seed": self.seed}


def _annotated(masks: Path, images: Path, tree: dict[str, list[Path]]) -> dict[Path, Path]:
    """Image -> its annotated mask; an error for a mask without an image and for a class without a mask."""
    if not masks.is_dir():
        raise FileNotFoundError(f"annotated masks folder not found: {masks}")
    by_name = {(label, path.stem): path for label, paths in tree.items() for path in paths}
    found, stray = {}, []
    for mask in sorted(masks.glob("*/*.png")):
        image = by_name.get((mask.parent.name, mask.stem))
        if image is None:
            stray.append(mask)
        else:
            found[image] = mask
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise ValueError(f"the annotated mask {stray[0]}{more} has no image {images}/{stray[0].parent.name}/"
                         f"{stray[0].stem}.<ext>: a mask has the relative name of its image")
    missing = [label for label, paths in tree.items() if paths and not any(path in found for path in paths)]
    if missing:
        example = tree[missing[0]][0]
        raise ValueError(f"{masks} holds no annotated mask for the class(es) {', '.join(missing)} of {images}: "
                         f"propagation needs at least one per class (e.g. {masks}/{missing[0]}/{example.stem}.png "
                         f"for {example})")
    return found


def _read_summary(folder: Path, source: dict[str, Any]) -> dict:
    """The summary of the masks in ``folder``; refuses masks that another source made, or no recorded one."""
    summary = recorded_summary(folder, f"{PREFIX}{source['from']}")
    made_by = {key: summary.get(key) for key in _SOURCE_KEYS}
    if summary and made_by != source:
        raise ValueError(f"{folder} holds masks made by {json.dumps(made_by)}, not by {json.dumps(source)}: delete "
                         f"{folder} to make them again")
    return summary


def _load(paths: list[Path], model: nn.Module, options: PropagationOptions, desc: str, progress: bool,
          bad: list[str]) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
    """``paths`` as the model takes them, (n, 3, H, W) at its input size; the indices read and their
    (H, W). An unreadable image raises, or with ``skip_bad`` is warned about and listed in ``bad``."""
    size = model_input_size(model)
    dataset = _Images(paths, resolve_model_data_config(model), size, None, None, False)
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers, collate_fn=_as_list)
    tensors, indices, sizes = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress):
        for item in batch:
            if not item.error:
                tensors.append(item.image)
                indices.append(item.index)
                sizes.append(item.size)
            elif options.skip_bad:
                warnings.warn(f"skipping: {item.error}")
                bad.append(item.error)
            else:
                raise ValueError(item.error)
    images = torch.stack(tensors) if tensors else torch.zeros(0, 3, *size)
    return images, indices, sizes


def _annotated_masks(pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]],
                     size: tuple[int, int]) -> torch.Tensor:
    """The annotated masks (n, H, W) in [0, 1] at the model's input ``size`` (area-weighted); an error
    naming the file for a mask whose size differs from its image's."""
    masks = []
    for (image, path), image_size in zip(pairs, sizes):
        mask = read_binary_mask(path)
        if mask.shape != image_size:
            raise ValueError(f"the annotated mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                             f"{image} is {image_size[1]}x{image_size[0]}: a mask has its image's size")
        masks.append(TF.resize(torch.from_numpy(mask)[None].float(), list(size), InterpolationMode.BILINEAR,
                               antialias=True)[0].clamp(0, 1))
    return torch.stack(masks)


def _fit_and_predict(model: nn.Module, annotated: dict[Path, Path], targets: list[Path],
                     options: PropagationOptions, progress: bool,
                     bad: list[str]) -> tuple[Propagation, list[int], list[tuple[int, int]]]:
    """``propagate_masks`` on the annotated images and ``targets``: the result, the targets read, their sizes."""
    pairs = list(annotated.items())
    strict = replace(options, skip_bad=False)  # an annotated image must be read
    images, _, sizes = _load([image for image, _ in pairs], model, strict, "reading the annotated images", False, [])
    masks = _annotated_masks(pairs, sizes, model_input_size(model))
    patch_tokens(model, images[:1], [-1])  # a model without patch tokens fails here, before the images are read
    loaded, read, target_sizes = _load(targets, model, options, "reading the images", progress, bad)
    with warnings.catch_warnings():  # the warning is given once, from the summary (it also holds the number)
        warnings.filterwarnings("ignore", message="propagated masks: held-out IoU")
        result = propagate_masks(model, images, masks, loaded, folds=options.folds, refine=options.refine,
                                 warn_below=options.warn_below, seed=options.seed, batch_size=options.batch_size,
                                 progress=progress)
    return result, read, target_sizes


def _write(mask: torch.Tensor, size: tuple[int, int], target: Path) -> bool:
    """Upsample a 0/1 mask (h, w) to ``size`` (H, W) and write it; False (nothing written) when empty."""
    full = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5
    if not full.any():
        return False
    write_mask(full.numpy(), target)
    return True


def _summarise(source: dict, images: Path, entries: list[tuple[str, Path, Path]], annotated: dict[Path, Path],
               unmasked: set[str], bad: list[str], fit: dict, warn_below: float) -> dict:
    """The counts of ``summary.json``, overall and per class, the held-out IoU and the warning line."""
    per_class: dict[str, dict[str, int]] = {}
    for label, image, target in entries:
        counts = per_class.setdefault(label, dict.fromkeys(_COUNTS, 0))
        counts["images"] += 1
        if image in annotated:
            counts["annotated"] += 1
        elif not target.is_file():
            counts["empty"] += 1
        else:
            counts["predicted"] += 1
            counts["whole"] += int(read_binary_mask(target).mean() >= FULL_SHARE)
    totals = {key: sum(counts[key] for counts in per_class.values()) for key in _COUNTS}
    iou = fit.get("held_out_iou")
    warning = None
    if iou is not None and iou < warn_below:
        warning = (f"warning: the propagated masks' held-out IoU with the annotated masks is {iou:.2f}, below "
                   f"{warn_below:g}: look at preview.png before training on them; annotate more images or read "
                   "another model's tokens")
    return {**source, **totals, "full_share": FULL_SHARE, "per_class": per_class, **fit, "warn_below": warn_below,
            "low_quality": warning is not None, "warning": warning, "unmasked": sorted(unmasked), "bad": bad,
            "images_folder": str(images)}


def propagate_folder(
        annotated: str | Path,
        images: str | Path,
        folder: str | Path,
        model: nn.Module | None,
        name: str,
        device: torch.device | str = "cpu",
        options: PropagationOptions = PropagationOptions(),
        progress: bool = True,
) -> dict:
    """Write a mask for every image of ``images`` (``<class>/<name>.<ext>``) into ``folder`` from the
    annotated masks in ``annotated`` (``<class>/<name>.png``, the images' relative names); returns the summary.

    ``model`` (named ``name`` in the summary) gives the tokens; it may be None when nothing is left
    to make. Masks already in ``folder`` (and images recorded as getting none) are skipped;
    ``folder/summary.json`` records the source (``annotated``, ``name``, the settings) and the counts,
    and ``folder/preview.png`` shows a sample. Raises ``ValueError`` for a class without an annotated
    mask, an annotated mask of another size than its image or without an image, and a ``folder`` that
    another source filled; ``TypeError`` (from ``propagate_masks``) for a model without patch tokens.
    Under ``torch.distributed`` every process masks every n-th image on its ``device``; all return
    when all masks are there (the summary is the first process's).
    """
    annotated, images, folder = Path(annotated), Path(images), Path(folder)
    rank, size = _world()
    tree = list_images(images)
    masks = _annotated(annotated, images, tree)
    source = {"method": "propagate", "from": str(annotated), "model": name, "settings": options.settings()}
    summary = _read_summary(folder, source)
    entries = [(label, path, folder / label / f"{path.stem}.png") for label, paths in tree.items() for path in paths]
    unmasked, bad = set(summary.get("unmasked", [])), list(summary.get("bad", []))
    todo = [(path, target) for _, path, target in entries if path not in masks and not target.exists()
            and path.relative_to(images).as_posix() not in unmasked]
    fit = {key: summary[key] for key in _FIT_KEYS if key in summary}
    if (todo or not fit) and model is None:
        raise ValueError(f"{folder} lacks the masks of {len(todo)} image(s) and no model is at hand to make them "
                         f"(a resumed run has left its starting weights): make them with `relevance-finetune masks "
                         f"--method propagate --from {annotated}` into {folder}, or delete {folder} and start anew")
    if not summary and rank == 0:  # recorded first, so that a crashed run's masks stay attributed
        write_text_atomic(folder / SUMMARY, json.dumps(source))
    _gather(None)  # every process has listed the folder before any mask is written
    mine = todo[rank::size]
    if mine or (rank == 0 and (todo or not fit)):
        start = next(model.parameters()).device
        try:
            result, read, sizes = _fit_and_predict(model.to(device), masks, [path for path, _ in mine], options,
                                                   progress and rank == 0, bad)
        finally:
            model.to(start)
        fit = {key: value for key, value in result.summary().items() if key in _FIT_KEYS}
        written = {index for index, mask, image_size in zip(read, result.masks, sizes)
                   if _write(mask, image_size, mine[index][1])}
        unmasked.update(path.relative_to(images).as_posix() for index, (path, _) in enumerate(mine)
                        if index not in written)  # empty masks and unreadable images
    if rank == 0:
        for image, mask in masks.items():  # the annotated images keep their own masks
            target = folder / image.parent.name / f"{image.stem}.png"
            if not target.exists():
                write_mask(read_binary_mask(mask), target)
    for paths, errors in _gather((sorted(unmasked), bad)):
        unmasked.update(paths)
        bad += [error for error in errors if error not in bad]
    if rank != 0:
        return summary
    summary = _summarise(source, images, entries, masks, unmasked, bad, fit, options.warn_below)
    write_text_atomic(folder / SUMMARY, json.dumps(summary, indent=1))
    write_preview(images, folder)
    if summary["warning"]:
        _log.warning("%s (%s)", summary["warning"], folder / SUMMARY)
    return summary


def propagated_masks(
        spec: str | None,
        images: str | Path | None,
        folder: str | Path,
        model: nn.Module | None,
        name: str,
        device: torch.device | str = "cpu",
        workers: int = 4,
        progress: bool = True,
        skip_bad: bool = False,
) -> str | None:
    """The masks folder ``spec`` names: ``spec`` itself, or for ``propagate:MASKS`` ``folder``, where
    the masks of ``images`` are propagated once from the annotated masks in MASKS (:func:`propagate_folder`
    with ``model``, named ``name``; ``spec`` when ``images`` is None: nothing to make)."""
    if spec is None or not str(spec).startswith(PREFIX) or images is None:
        return spec
    annotated = str(spec)[len(PREFIX):].strip()
    if not annotated:
        raise ValueError(f"{spec!r} names no folder: expected propagate:MASKS, MASKS a folder of <class>/<name>.png "
                         "masks of a few of the images")
    if Path(images).is_file():
        raise ValueError(f"{spec} makes masks for a folder of <class>/<name> images, not for the file {images}")
    propagate_folder(annotated, images, folder, model, name, device,
                     PropagationOptions(workers=workers, skip_bad=skip_bad), progress)
    return str(folder)
