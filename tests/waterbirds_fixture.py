"""A miniature Waterbirds in the release's exact layout, for tests and the example.

``ROOT/waterbirds/metadata.csv`` (``img_id,img_filename,y,split,place,place_filename``), images at
``ROOT/waterbirds/<CUB class folder>/<CUB name>.jpg`` of varied sizes, and CUB's soft segmentations
(0-255 greyscale PNGs, the alpha the release's generation script used) at
``ROOT/CUB_200_2011/segmentations/<same path>.png``. The label is learnable: waterbirds are
yellow, landbirds brown; the background (the spurious attribute) is blue water or green land.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_PER_GROUP", "write_mini_waterbirds"]

# split -> images of groups (landbird on land, landbird on water, waterbird on land, waterbird on water);
# the training split is imbalanced the release's way (the majority groups 0 and 3), val and test balanced
DEFAULT_PER_GROUP: dict[int, tuple[int, int, int, int]] = {0: (6, 2, 2, 6), 1: (3, 3, 3, 3), 2: (3, 3, 3, 3)}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CLASS_FOLDERS = {0: ("009.Brewer_Blackbird", "010.Red_winged_Blackbird"),
                 1: ("001.Black_footed_Albatross", "002.Laysan_Albatross")}
PLACES = {0: "/b/bamboo_forest", 1: "/o/ocean"}
BIRD_COLOURS = {0: (120, 70, 30), 1: (230, 200, 40)}
PLACE_COLOURS = {0: (40, 130, 50), 1: (40, 90, 200)}


def _soft_ellipse(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A (H, W) uint8 soft bird silhouette: 255 inside, ramping to 0 over a few pixels."""
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    ry, rx = height * rng.uniform(0.22, 0.32), width * rng.uniform(0.22, 0.32)
    y, x = np.mgrid[0:height, 0:width]
    distance = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return (np.clip((1.15 - distance) / 0.3, 0, 1) * 255).round().astype(np.uint8)


def _picture(alpha: np.ndarray, y: int, place: int, rng: np.random.Generator) -> np.ndarray:
    """The bird pasted onto its place with the soft alpha, plus noise: (H, W, 3) uint8."""
    weight = alpha[..., None] / 255.0
    bird, background = np.array(BIRD_COLOURS[y], float), np.array(PLACE_COLOURS[place], float)
    pixels = weight * bird + (1 - weight) * background + rng.normal(0, 12, (*alpha.shape, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def write_mini_waterbirds(
        root: Path,
        *,
        per_group: dict[int | str, tuple[int, int, int, int]] | None = None,
        size: tuple[int, int] = (40, 48),
        seed: int = 0,
        folder: str = "waterbirds",
) -> dict:
    """Write the miniature release under ``root``.

    Parameters
    ----------
    per_group:
        Split (0/1/2 or ``'train'``/``'val'``/``'test'``) -> images of groups 0..3 (group = 2 * y + place);
        default :data:`DEFAULT_PER_GROUP`.
    size:
        (height, width) around which image sizes vary (by up to a quarter, as CUB's do).
    folder:
        The dataset folder's name (``'waterbird_complete95_forest2water2'``, ``'waterbirds_v1.0'``, ...).

    Returns
    -------
    ``{"root": ROOT/folder, "metadata": its metadata.csv, "segmentations": ROOT/CUB_200_2011/segmentations,
    "rows": the metadata rows as dicts of ints and strings}``.
    """
    root = Path(root)
    data, segmentations = root / folder, root / "CUB_200_2011" / "segmentations"
    rng = np.random.default_rng(seed)
    counts = {SPLIT_CODES.get(split, split): n for split, n in (per_group or DEFAULT_PER_GROUP).items()}
    rows = []
    for split in sorted(counts):
        for group, count in enumerate(counts[split]):
            y, place = divmod(group, 2)
            for _ in range(count):
                img_id = len(rows) + 1
                class_folder = CLASS_FOLDERS[y][img_id % 2]
                species = class_folder.split(".", 1)[1].title()
                name = f"{class_folder}/{species}_{img_id:04d}_{rng.integers(1000, 999999)}.jpg"
                height, width = (int(s * rng.uniform(0.75, 1.25)) for s in size)
                alpha = _soft_ellipse(height, width, rng)
                image_path, mask_path = data / name, (segmentations / name).with_suffix(".png")
                image_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_picture(alpha, y, place, rng)).save(image_path, quality=95)
                Image.fromarray(alpha).save(mask_path)
                rows.append({"img_id": img_id, "img_filename": name, "y": y, "split": split, "place": place,
                             "place_filename": f"{PLACES[place]}/{img_id:08d}.jpg"})
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"root": data, "metadata": data / "metadata.csv", "segmentations": segmentations, "rows": rows}
