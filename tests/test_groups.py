"""Group-labelled data: the miniature Waterbirds fixture, the readers and their bad input."""
from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from waterbirds_fixture import write_mini_waterbirds


def test_mini_waterbirds_has_the_release_layout(tmp_path):
    paths = write_mini_waterbirds(tmp_path, per_group={"train": (2, 1, 1, 2), 2: (1, 1, 1, 1)})
    assert paths["root"] == tmp_path / "waterbirds" and paths["segmentations"] == tmp_path / "CUB_200_2011/segmentations"
    with open(paths["metadata"], newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    assert [(r["split"], r["y"], r["place"]) for r in rows] == [
        ("0", "0", "0"), ("0", "0", "0"), ("0", "0", "1"), ("0", "1", "0"), ("0", "1", "1"), ("0", "1", "1"),
        ("2", "0", "0"), ("2", "0", "1"), ("2", "1", "0"), ("2", "1", "1")]
    sizes, soft = set(), False
    for row in rows:
        folder, name = row["img_filename"].split("/")
        assert folder[:3].isdigit() and folder[3] == "." and name.endswith(".jpg")
        image = Image.open(paths["root"] / row["img_filename"])
        mask = np.asarray(Image.open(paths["segmentations"] / row["img_filename"].replace(".jpg", ".png")))
        assert mask.shape == (image.height, image.width) and mask.dtype == np.uint8 and mask.max() == 255
        soft |= bool(((mask > 0) & (mask < 255)).any())
        sizes.add(image.size)
    assert soft and len(sizes) > 1
