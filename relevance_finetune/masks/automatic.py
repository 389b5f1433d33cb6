"""TokenCut masks of an image folder, written as ``OUT/<class>/<stem>.png``.

:func:`write_tokencut_masks` is the work of ``relevance-finetune masks``; :func:`tokencut_folder`
is what ``relevance-finetune train --masks tokencut:MODEL`` makes of it: the masks of a labelled
folder, made once into the run's folder (the layout ``MaskedImageFolder(images=..., masks=...)``
reads), resumed where they stopped, summed up in ``summary.json`` and shown in ``preview.png``.

An image gets no mask where the bilateral refinement is discarded (IoU < 0.5 with the coarse mask)
or the mask has under ``min_pixels`` foreground pixels: such a mask counts as *empty*. A mask
covering at least ``FULL_SHARE`` of its image counts as *full*. More than ``WARN_SHARE`` of the
images with an empty or full mask gives one warning: TokenCut found no single object in many of
them (a model that is not self-supervised, or scenes without one main object).
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from .._files import write_text_atomic
from ..images import list_images, model_input_size, read_binary_mask, read_image, write_mask
from .bilateral import bilateral_refine
from .preview import PREVIEW, write_preview
from .tokencut import last_block_keys, tokencut_partition, upsample_mask

__all__ = ["FULL_SHARE", "PREFIX", "SUMMARY", "WARN_SHARE", "MaskCounts", "TokenCutOptions", "patch_multiple_size",
           "recorded_summary", "tokencut_folder", "write_tokencut_masks"]

PREFIX = "tokencut:"  # --masks tokencut:MODEL
SUMMARY = "summary.json"  # beside the masks: the model that made them and their counts
FULL_SHARE = 0.95  # a mask covering at least this share of its image counts as the whole image
WARN_SHARE = 0.1  # warn when more than this share of the images has an empty or whole mask

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenCutOptions:
    """The settings of ``relevance-finetune masks`` (its flags of the same names; these are its defaults)."""

    tau: float = 0.2
    eps: float = 1e-5
    refine: Literal["bilateral", "none"] = "bilateral"
    component: Literal["reference", "largest"] = "reference"
    resize: Literal["model", "aspect"] = "model"
    short_side: int | None = None
    min_pixels: int = 520
    skip_bad: bool = False
    batch_size: int = 16
    workers: int = 4


@dataclass
class MaskCounts:
    """What :func:`write_tokencut_masks` did: masks written, images left without one, bad images."""

    written: int = 0
    dropped: int = 0  # refinement discarded (IoU < 0.5)
    small: int = 0  # under min_pixels
    unmasked: list[Path] = field(default_factory=list)  # the images of ``dropped``, ``small`` and ``bad``
    bad: list[str] = field(default_factory=list)  # why each skipped image could not be read


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

    def __init__(self, paths: Sequence[Path], config: dict, size: tuple[int, int] | None,
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


def write_tokencut_masks(
        model: nn.Module,
        images: Sequence[Path],
        targets: Sequence[Path],
        device: torch.device,
        options: TokenCutOptions = TokenCutOptions(),
        desc: str = "tokencut",
        progress: bool = True,
) -> MaskCounts:
    """Write the TokenCut mask of each of ``images`` to its ``targets`` path (0/255 PNG, the image's size).

    ``model`` (a timm ViT, on ``device``, in eval mode) gives the last-block keys; each write is
    atomic. Images whose mask is discarded or small get none (listed in ``unmasked``); an unreadable
    image raises ``ValueError`` naming it, or is warned about and counted with ``options.skip_bad``.
    """
    size = model_input_size(model) if options.resize == "model" else None
    patch = tuple(model.patch_embed.patch_size) if size is None else None
    dataset = _Images(images, resolve_model_data_config(model), size, patch, options.short_side,
                      options.refine == "bilateral")
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers, collate_fn=_as_list)
    counts = MaskCounts()
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            by_shape: dict[tuple[int, ...], list[_Item]] = {}  # one forward per input size
            for item in batch:
                if not item.error:
                    by_shape.setdefault(tuple(item.image.shape), []).append(item)
                elif options.skip_bad:
                    warnings.warn(f"skipping: {item.error}")
                    counts.bad.append(item.error)
                    counts.unmasked.append(images[item.index])
                else:
                    raise ValueError(item.error)
            for group in by_shape.values():
                keys, grid = last_block_keys(model, torch.stack([item.image for item in group]).to(device))
                for key, item in zip(keys.float().cpu(), group):
                    if not _write_one(key, grid, item, targets[item.index], options, counts):
                        counts.unmasked.append(images[item.index])
            bar.update(len(batch))
    return counts


def _write_one(key: torch.Tensor, grid: tuple[int, int], item: _Item, target: Path, options: TokenCutOptions,
               counts: MaskCounts) -> bool:
    """Partition, upsample and refine one image's mask; write it, or count why not. Whether it was written."""
    mask = upsample_mask(tokencut_partition(key, grid, options.tau, options.eps), item.size)
    if options.refine == "bilateral":
        mask = bilateral_refine(item.original, mask, component=options.component)
    if mask is None:
        counts.dropped += 1
        return False
    if mask.sum() < options.min_pixels:
        counts.small += 1
        return False
    write_mask(mask, target)
    counts.written += 1
    return True


# -- train --masks tokencut:MODEL ---------------------------------------------------------------
def _model_of(spec: str | None) -> str | None:
    """MODEL of ``tokencut:MODEL``; None for anything else (a masks folder)."""
    if spec is None or not str(spec).startswith(PREFIX):
        return None
    model = str(spec)[len(PREFIX):].strip()
    if not model:
        raise ValueError(f"{spec!r} names no model: expected tokencut:MODEL, MODEL a timm name (e.g. "
                         "vit_small_patch16_224.dino), local-dir:DIR or hf-hub:ORG/NAME")
    return model


def recorded_summary(folder: Path, making: str) -> dict:
    """``folder/summary.json`` ({} for a new or empty folder); an error for a folder with files but
    no summary, or an unreadable one (``making``: the masks the caller would make there)."""
    path = folder / SUMMARY
    if not path.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder} holds files but no {SUMMARY} naming what made them: delete {folder} (or "
                             f"choose another folder) to make the masks of {making} there")
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"cannot read {path} ({error}): delete {folder} to make the masks again") from None


def _read_summary(folder: Path, name: str) -> dict:
    """The summary of the masks in ``folder``; refuses masks another model (or no recorded run) made."""
    summary = recorded_summary(folder, f"tokencut:{name}")
    if not summary:
        return summary
    if summary.get("method", "tokencut") != "tokencut":
        raise ValueError(f"{folder} holds masks made by {summary['method']}, not TokenCut's: delete {folder} to make "
                         f"the masks of tokencut:{name} there")
    if summary.get("model") != name:
        raise ValueError(f"{folder} holds the TokenCut masks of {summary.get('model')}, not of {name}: delete "
                         f"{folder} to make them again with {name}")
    return summary


def _summarise(name: str, images: Path, pairs: list[tuple[Path, Path]], unmasked: set[str],
               bad: list[str]) -> dict:
    """The counts of ``summary.json``: images, masks, empty (no mask) and full ones, the thresholds."""
    coverage = [read_binary_mask(target).mean() for _, target in pairs if target.is_file()]
    return {"model": name, "images": len(pairs), "masks": len(coverage), "empty": len(pairs) - len(coverage),
            "full": int(sum(share >= FULL_SHARE for share in coverage)), "full_share": FULL_SHARE,
            "warn_share": WARN_SHARE, "unmasked": sorted(unmasked), "bad": bad, "images_folder": str(images)}


def _warn_degenerate(summary: dict, folder: Path) -> None:
    """One warning line when more than ``WARN_SHARE`` of the images have an empty or full mask."""
    degenerate = summary["empty"] + summary["full"]
    if degenerate > WARN_SHARE * summary["images"]:
        _log.warning("warning: the TokenCut masks of %d of %d images by %s are empty (%d, those images are left out) or cover "
                     "at least %d%% of the image (%d): more than %d%%, see %s", degenerate, summary["images"],
                     summary["model"], summary["empty"], round(100 * FULL_SHARE), summary["full"],
                     round(100 * WARN_SHARE), folder / SUMMARY)


def _world() -> tuple[int, int]:
    """(rank, number of processes) under ``torch.distributed``, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value: Any) -> list[Any]:
    """Every process's ``value`` (a collective: it also waits for them all)."""
    if _world()[1] == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _make(name: str, images: Path, folder: Path, build: Callable[..., nn.Module], device: torch.device,
          options: TokenCutOptions, progress: bool) -> None:
    """Make the missing masks of ``images`` in ``folder`` with model ``name``, each process its share,
    and (first process) rewrite the summary and warn if many are degenerate."""
    rank, size = _world()
    summary = _read_summary(folder, name)
    pairs = [(path, folder / label / f"{path.stem}.png") for label, paths in list_images(images).items()
             for path in paths]
    unmasked, bad = set(summary.get("unmasked", [])), list(summary.get("bad", []))
    todo = [(path, target) for path, target in pairs
            if not target.exists() and path.relative_to(images).as_posix() not in unmasked]
    model = build(name, pretrained=True).eval().to(device) if todo else None  # a bad name fails before any write
    if todo and not summary and rank == 0:  # recorded first, so a crashed run's masks stay attributed
        write_text_atomic(folder / SUMMARY, json.dumps({"model": name}))
    _gather(None)  # every process has listed the folder before any mask is written
    mine = todo[rank::size]
    counts = MaskCounts() if not mine else write_tokencut_masks(
        model, *zip(*mine), device=device, options=options, progress=progress and rank == 0,
        desc=f"tokencut masks of {images.name}" + (f" ({rank}/{size})" if size > 1 else ""))
    for paths, errors in _gather(([path.relative_to(images).as_posix() for path in counts.unmasked], counts.bad)):
        unmasked.update(paths)
        bad += errors
    if rank != 0:
        return
    if todo or summary.get("images") != len(pairs):
        summary = _summarise(name, images, pairs, unmasked, bad)
        write_text_atomic(folder / SUMMARY, json.dumps(summary, indent=1))
    if todo or not (folder / PREVIEW).is_file():
        write_preview(images, folder)
    _warn_degenerate(summary, folder)


def tokencut_folder(
        spec: str | None,
        images: str | Path | None,
        folder: str | Path,
        build: Callable[..., nn.Module],
        device: torch.device | str = "cpu",
        workers: int = 4,
        progress: bool = True,
        skip_bad: bool = False,
) -> str | None:
    """The masks folder ``spec`` names: ``spec`` itself, or for ``tokencut:MODEL`` ``folder``, where
    the TokenCut masks of ``images`` (``<class>/<name>.<ext>``) are made once (``spec`` when
    ``images`` is None: no images, nothing to make).

    ``build(MODEL, pretrained=True)`` makes the model (``models.create_model``: any timm name,
    ``local-dir:`` and ``hf-hub:`` included, with its weights). Masks already in ``folder`` (and
    images recorded as getting none) are skipped; ``folder/summary.json`` records the model and the
    counts. Raises ``ValueError`` when ``folder`` holds masks of another model. Under
    ``torch.distributed`` every process makes every n-th mask on its ``device``; all return when
    all masks are there.
    """
    name = _model_of(spec)
    if name is None or images is None:
        return spec
    images, folder = Path(images), Path(folder)
    if images.is_file():
        raise ValueError(f"{spec} makes masks for a folder of <class>/<name> images, not for the file {images}")
    _make(name, images, folder, build, torch.device(device), TokenCutOptions(skip_bad=skip_bad, workers=workers),
          progress)
    return str(folder)
