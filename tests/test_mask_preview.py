"""The contact sheet beside automatic masks: a seeded sample spread over the classes, outlines where the edges are."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from relevance_finetune.masks.preview import OUTLINE_COLOR, draw_outline, preview_sample, write_preview


def magenta_pixels(path) -> int:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(pixels - OUTLINE_COLOR).sum(axis=-1) < 60).sum())


def make_folder(root, classes=("cat", "dog", "owl"), per_class=(10, 3, 1)) -> None:
    """Grey images with a dark square; masks of the square for all but the owl."""
    for name, count in zip(classes, per_class):
        for i in range(count):
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            pixels = np.full((48, 64, 3), 150, np.uint8)
            pixels[10:30, 20:40] = 40
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.jpg")
            if name != "owl":
                (root / "masks" / name).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((48, 64), np.uint8)
                mask[10:30, 20:40] = 255
                Image.fromarray(mask).save(root / "masks" / name / f"{i}.png")


def test_the_outline_lies_on_the_mask_edge_only():
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 4:12] = True
    drawn = draw_outline(image, mask, width=1)
    painted = (drawn == OUTLINE_COLOR).all(axis=-1)
    ring = mask.copy()
    ring[6:14, 5:11] = False  # the inner edge, one pixel wide
    assert (painted == ring).all() and (image == 0).all()  # the input stays as it was
    assert (draw_outline(image, np.ones((20, 20), bool), width=1) == OUTLINE_COLOR).all(axis=-1)[0].all()
    assert not (draw_outline(image, np.zeros((20, 20), bool)) == OUTLINE_COLOR).all(axis=-1).any()
    with pytest.raises(ValueError, match=r"mask of shape \(20, 19\) for an image of shape \(20, 20\)"):
        draw_outline(image, mask[:, :19])


def test_the_sample_is_seeded_and_spread_over_the_classes(tmp_path):
    tree = {"cat": [tmp_path / f"c{i}" for i in range(10)], "dog": [tmp_path / f"d{i}" for i in range(3)],
            "owl": [tmp_path / "o0"]}
    sample = preview_sample(tree, count=6)
    assert [label for label, _ in sample] == ["cat", "dog", "owl", "cat", "dog", "cat"]
    assert sample == preview_sample(tree, count=6) and sample != preview_sample(tree, count=6, seed=1)
    assert len(preview_sample(tree, count=24)) == 14 and len({path for _, path in preview_sample(tree)}) == 14


def test_the_sheet_outlines_the_masks_it_has(tmp_path):
    make_folder(tmp_path)
    path = write_preview(tmp_path / "images", tmp_path / "masks")
    assert path == tmp_path / "masks" / "preview.png" and path.stat().st_size > 0
    outlined = magenta_pixels(path)
    assert outlined > 100
    only_owl = tmp_path / "only_owl"
    make_folder(only_owl, classes=("owl",), per_class=(4,))
    (only_owl / "masks").mkdir()
    assert magenta_pixels(write_preview(only_owl / "images", only_owl / "masks")) == 0  # no mask, no outline
    assert not [p for p in (tmp_path / "masks").iterdir() if p.name.startswith(".")]  # written atomically
