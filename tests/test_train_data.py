"""What ``train`` says of its data before it trains: masks it cannot learn from, classes a split empties."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from relevance_finetune import cli
from test_train_runs import TINY_RANDOM, train_args, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe", [None, "recommended"])
def test_empty_and_full_training_masks_are_counted_and_warned_on_their_own_line(tmp_path, caplog, recipe):
    data = write_folder(tmp_path / "data", per_class=2)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "data" / "masks" / "cat" / "0.png")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "data" / "masks" / "dog" / "1.png")
    caplog.set_level(logging.INFO)
    args = train_args(data, tmp_path / "run", *TINY_RANDOM, "--val-data", data,
                      *(["--recipe", recipe] if recipe else []))
    assert cli.main(args) == 0
    assert "6 training images of 3 classes (cat, dog, fox), each with its mask (1 empty and 1 full: see the " \
           "warning); 6 validation images" in caplog.text
    warning = next(record for record in caplog.records if record.levelno == logging.WARNING
                   and record.getMessage().startswith("train: warning:"))
    assert warning.getMessage().startswith(
        "train: warning: 1 empty (no object: the whole image counts as background) and 1 full (no background: the "
        "whole image counts as object) of the 6 training masks, first: ") and "cat/0.png" in warning.getMessage()


def test_a_class_that_val_fraction_would_empty_keeps_a_training_image_and_is_named(tmp_path, caplog):
    data = write_folder(tmp_path / "data", classes=("dog", "fox"), per_class=3)
    write_folder(tmp_path / "data", classes=("cat",), per_class=1)  # sorted first: index 0 of the 7 images
    caplog.set_level(logging.INFO)
    args = train_args(data, tmp_path / "run", *TINY_RANDOM, "--val-fraction", "0.3", "--seed", "0")
    assert cli.main(args) == 0  # seed 0 draws images 4 and 0 (cat's only one) of 7 for validation
    assert ("train: warning: --val-fraction 0.3 held out every image of the class(es) cat: one image of each stays "
            "in training (and is not validated)") in caplog.text
    assert "train: 6 training images of 3 classes (cat, dog, fox), each with its mask; 1 validation images" \
           in caplog.text
