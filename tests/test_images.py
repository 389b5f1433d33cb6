"""``read_image``: every PIL mode a user's files come in, read as the 8-bit RGB the model sees."""
import numpy as np
import pytest
from PIL import Image

from relevance_finetune.images import read_image

SIXTEEN_BIT = np.array([[0, 128, 129, 257], [32896, 65278, 65535, 1000]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = np.array([[0, 0, 1, 1], [128, 254, 255, 4]], dtype=np.uint8)  # round(v / 257)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def _palette(transparency: int | bytes | None) -> Image.Image:
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


WHITE = (255, 255, 255)
PALETTE_RGB = np.array([[[10, 20, 30], [200, 100, 50]], [[0, 255, 0], [200, 100, 50]]], dtype=np.uint8)
CASES = {
    # name: (file suffix, image to write, the RGB read_image must return)
    "I;16 png": (".png", lambda: Image.fromarray(SIXTEEN_BIT), _grey(SIXTEEN_BIT_AS_8)),
    "I;16B tiff": (".tif", lambda: Image.frombytes("I;16B", (4, 2), SIXTEEN_BIT.astype(">u2").tobytes()),
                   _grey(SIXTEEN_BIT_AS_8)),
    "I tiff": (".tif", lambda: Image.fromarray(SIXTEEN_BIT.astype(np.int32)), _grey(SIXTEEN_BIT_AS_8)),
    "F tiff": (".tif", lambda: Image.fromarray(np.array([[0, 0.5, 1, 0.1]], dtype=np.float32)),
               _grey([[0, 128, 255, 26]])),
    "L png": (".png", lambda: Image.fromarray(np.array([[0, 7, 128, 255]], dtype=np.uint8)), _grey([[0, 7, 128, 255]])),
    "1 png": (".png", lambda: Image.fromarray(np.array([[True, False]])), _grey([[255, 0]])),
    "RGB png": (".png", lambda: Image.fromarray(PALETTE_RGB), PALETTE_RGB),
    "P png": (".png", lambda: _palette(None), PALETTE_RGB),
    "P png, transparent index": (".png", lambda: _palette(1),
                                 np.array([[[10, 20, 30], WHITE], [[0, 255, 0], WHITE]], dtype=np.uint8)),
    "RGBA png": (".png", lambda: Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], dtype=np.uint8)),
                 np.array([[[10, 20, 30], WHITE]], dtype=np.uint8)),
    "LA png": (".png", lambda: Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), mode="LA"),
               np.array([[[100] * 3, WHITE]], dtype=np.uint8)),
    "CMYK tiff": (".tif", lambda: Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255])),
                  np.array([[WHITE, [0, 255, 255], [0, 0, 0]]], dtype=np.uint8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_modes_read_as_8_bit_rgb(tmp_path, name):
    suffix, make, expected = CASES[name]
    path = tmp_path / f"image{suffix}"
    make().save(path)
    with Image.open(path) as written:  # the file really holds the mode under test
        assert written.mode == name.split()[0]
    image = read_image(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_partial_transparency_is_composited_onto_white(tmp_path):
    rgba = Image.fromarray(np.array([[[10, 20, 30, 128]]], dtype=np.uint8))
    rgba.save(tmp_path / "rgba.png")
    _palette(bytes([128, 255, 0])).save(tmp_path / "p.png")
    half = np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255
    assert np.abs(np.asarray(read_image(tmp_path / "rgba.png"))[0, 0] - half).max() <= 1
    palette = np.asarray(read_image(tmp_path / "p.png"))
    assert np.abs(palette[0, 0] - half).max() <= 1 and tuple(palette[1, 0]) == WHITE
    assert tuple(palette[0, 1]) == (200, 100, 50)


@pytest.mark.parametrize("name, make, match", [
    ("lab.tif", lambda: Image.new("LAB", (2, 2)), "mode 'LAB' is not supported"),
    ("ycbcr.tif", lambda: Image.new("YCbCr", (2, 2)), "mode 'YCbCr' is not supported"),
    ("big.tif", lambda: Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), r"'I' holds values in \[0, 70000\]"),
    ("negative.tif", lambda: Image.fromarray(np.array([[-1, 5]], dtype=np.int32)), r"'I' holds values in \[-1, 5\]"),
    ("float.tif", lambda: Image.fromarray(np.array([[0, 2.5]], dtype=np.float32)), r"'F' holds values in \[0, 2.5\]"),
    ("nan.tif", lambda: Image.fromarray(np.array([[0, np.nan]], dtype=np.float32)), "'F' holds values"),
])
def test_other_modes_and_ranges_are_refused_naming_mode_and_file(tmp_path, name, make, match):
    make().save(tmp_path / name)
    with pytest.raises(ValueError, match=f"cannot read image .*{name}: .*{match}"):
        read_image(tmp_path / name)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "absent.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        read_image(tmp_path / "bad.png")
