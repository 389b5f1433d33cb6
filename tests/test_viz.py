"""viz: overlays and the before/after grid are written as PNGs that show the relevance."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from relevance_finetune import viz


def gray_image(size: int = 32) -> torch.Tensor:
    return torch.full((3, size, size), 0.5)


def corner_relevance(size: int = 32) -> torch.Tensor:
    relevance = torch.zeros(size, size)
    relevance[: size // 2, : size // 2] = 1.0
    return relevance


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_denormalize_inverts_the_data_config():
    config = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 8, 8)}
    images = torch.rand(2, 3, 8, 8)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    torch.testing.assert_close(viz.denormalize((images - mean) / std, config), images)
    torch.testing.assert_close(viz.denormalize((images[0] - mean) / std, config), images[0])


def test_overlay_colours_the_relevant_region_and_leaves_the_rest_visible(tmp_path):
    path = viz.save_overlay(tmp_path / "sub" / "one.png", gray_image(), corner_relevance(), "Pred: cat (90%)")
    pixels = read_png(path)
    # jet: 1 -> dark red; find the drawn image by its red (left of the colour bar)
    pixels = pixels[:, : int(pixels.shape[1] * 0.75)]
    redness = pixels[..., 0] - pixels[..., 2]
    rows, cols = np.nonzero(redness > 40)
    top, left = rows.min(), cols.min()
    middle_row, middle_col = rows.max() + 1, cols.max() + 1
    size = middle_row - top  # the red quadrant is a quarter of the square image
    assert redness[top + 3: middle_row - 3, left + 3: middle_col - 3].min() > 40       # relevant: red
    irrelevant = pixels[middle_row + 3: top + 2 * size - 3, middle_col + 3: left + 2 * size - 3]
    np.testing.assert_allclose(irrelevant, 127.5, atol=2)  # irrelevant: the image as it is
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_overlay_blends_by_relevance_and_adds_a_colour_bar():
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    relevance = torch.rand(16, 16).numpy()
    ax = viz.overlay(image, relevance, title="t", alpha=0.3)
    assert ax.get_title() == "t"
    drawn = ax.get_images()
    assert len(drawn) == 2
    np.testing.assert_allclose(drawn[1].get_alpha(), 0.3 * relevance, rtol=1e-6)
    np.testing.assert_allclose(drawn[0].get_array(), image / 255, atol=1e-6)
    assert len(ax.figure.axes) == 2  # the image and its colour bar
    assert viz.overlay(image, torch.rand(16, 16), ax=ax, colorbar=False) is ax
    assert len(ax.figure.axes) == 2


def test_figures_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = viz.save_overlay(tmp_path / "one.png", gray_image(), corner_relevance())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("image, relevance, message", [
    (torch.randn(3, 8, 8) * 3, torch.rand(8, 8), "denormalize"),
    (torch.rand(3, 8, 8), torch.rand(8, 8) * 5, "normalize_relevance"),
    (torch.rand(3, 8, 8), torch.rand(4, 4), r"shape \(8, 8\)"),
    (torch.rand(1, 8, 8), torch.rand(8, 8), r"\(3, H, W\)"),
    (torch.rand(3, 8, 8), torch.full((8, 8), float("nan")), "NaN"),
])
def test_overlay_rejects_bad_input(image, relevance, message):
    with pytest.raises(ValueError, match=message):
        viz.overlay(image, relevance)


def test_before_after_grid_layout(tmp_path, monkeypatch):
    figures = []
    save_figure = viz.save_figure
    monkeypatch.setattr(viz, "save_figure", lambda figure, path: figures.append(figure) or save_figure(figure, path))
    images = torch.stack([gray_image(), gray_image()])
    before = torch.stack([corner_relevance(), corner_relevance()])
    after = before.flip(-1)
    path = viz.before_after_grid(images, before, after, ["Pred: snowplow (40%)"] * 2, ["Pred: bus (70%)"] * 2,
                                 tmp_path / "grid.png")
    pixels = read_png(path)
    height, width, _ = pixels.shape
    assert width > height * 0.5  # two columns, three rows of square cells
    redness = pixels[..., 0] - pixels[..., 2]
    reddest_rows = np.nonzero((redness > 40).any(axis=1))[0]
    # red appears in the two overlay rows (lower two thirds), never in the input row
    assert reddest_rows.min() > height / 3 - 10
    assert reddest_rows.max() > 2 * height / 3
    assert len(figures[0].axes) == 3 * 2 + 1  # the cells and one colour bar


def test_before_after_grid_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="same non-zero number"):
        viz.before_after_grid([gray_image()], [corner_relevance()] * 2, [corner_relevance()],
                              ["a"], ["b"], tmp_path / "grid.png")
    assert not list(tmp_path.iterdir())


def test_prediction_title():
    assert viz.prediction_title("tabby cat", 0.873) == "Pred: tabby cat (87%)"
    assert viz.prediction_title("bus", 0.001, prefix="After") == "After: bus (<1%)"
    assert viz.prediction_title("bus", 0.5, true_label="tram") == "Pred: bus (50%), true: tram"
