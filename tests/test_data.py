"""Paired transforms, masked folder and CSV datasets, bad input; fixtures in real on-disk formats."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from relevance_finetune.data import (
    MaskedCsvDataset, MaskedImageFolder, PairedTransform, class_indices, imagenet_class_index,
    paired_transforms, read_binary_mask, write_mask)

SIZES = [(40, 30), (36, 48)]  # (width, height) of the images of each class


def save_image(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def blob(width, height):
    """A bool mask with an off-centre rectangle (asymmetric, so flips show)."""
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4: height // 2 + 3, width // 8: width // 2] = True
    return mask


def save_mask(path, mask, scale=255, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * scale, mode=mode).save(path)


def make_folder(root, classes=("cat", "dog"), per_class=2, scale=255):
    """``root/images/<class>/<i>.jpg`` and ``root/masks/<class>/<i>.png``."""
    for c, name in enumerate(classes):
        width, height = SIZES[c % len(SIZES)]
        for i in range(per_class):
            save_image(root / "images" / name / f"{i}.jpg", width, height, seed=10 * c + i)
            save_mask(root / "masks" / name / f"{i}.png", blob(width, height), scale)
    return root


# -- mask files --------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,mode", [(255, "L"), (1, "L"), (1, "P")])
def test_read_binary_mask_encodings(tmp_path, scale, mode):
    mask = blob(20, 10)
    save_mask(tmp_path / "m.png", mask, scale, mode)
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "m.png"), mask)


def test_read_binary_mask_rejects_other_values(tmp_path):
    save_mask(tmp_path / "grey.png", blob(20, 10), scale=128)
    with pytest.raises(ValueError, match="grey.png.*128"):
        read_binary_mask(tmp_path / "grey.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*colour"):
        read_binary_mask(tmp_path / "rgb.png")


def test_write_mask_round_trip_is_atomic(tmp_path):
    mask = blob(21, 13)
    write_mask(mask, tmp_path / "a" / "b.png")
    with Image.open(tmp_path / "a" / "b.png") as image:
        assert image.mode == "L" and set(np.unique(np.asarray(image)).tolist()) == {0, 255}
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "a" / "b.png"), mask)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.png"]


# -- class indices -----------------------------------------------------------------------------
def test_class_indices():
    assert class_indices(["dog", "cat"]) == {"cat": 0, "dog": 1}
    wnids = imagenet_class_index()
    assert class_indices(["n01443537", "n01440764"]) == {"n01440764": 0, "n01443537": 1}
    assert class_indices(["n04356056"], "imagenet") == {"n04356056": wnids["n04356056"]}
    assert class_indices(["n01443537", "n01440764"], "folder") == {"n01440764": 0, "n01443537": 1}
    with pytest.raises(ValueError, match="n99999999"):
        class_indices(["n01440764", "n99999999"])


# -- MaskedImageFolder -------------------------------------------------------------------------
def test_masked_image_folder_yields_pairs(tmp_path):
    dataset = MaskedImageFolder(make_folder(tmp_path, scale=1))
    assert len(dataset) == 4 and dataset.classes == ["cat", "dog"]
    image, mask, label = dataset[3]
    width, height = SIZES[1]
    assert image.shape == (3, height, width) and image.dtype == torch.float32
    assert mask.shape == (1, height, width) and mask.dtype == torch.float32
    assert label == 1
    np.testing.assert_array_equal(mask[0].numpy(), blob(width, height))


def test_masked_image_folder_wnids_take_imagenet_indices(tmp_path):
    dataset = MaskedImageFolder(make_folder(tmp_path, classes=("n01443537", "n04356056"), per_class=1))
    assert [label for *_, label in dataset] == [1, imagenet_class_index()["n04356056"]]
    folder = MaskedImageFolder(tmp_path, class_index="folder")
    assert [label for *_, label in folder] == [0, 1]


def test_masked_image_folder_separate_dirs_and_unmasked(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks" / "dog" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/dog/1\.jpg.*masks/dog/1\.png"):
        MaskedImageFolder(images=tmp_path / "images", masks=tmp_path / "masks")
    dataset = MaskedImageFolder(images=tmp_path / "images", masks=tmp_path / "masks", skip_unmasked=True)
    assert len(dataset) == 3 and dataset.unmasked == 1


def test_missing_mask_names_skip_unmasked(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks" / "dog" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images have none; skip_unmasked=True, `train --skip-unm"):
        MaskedImageFolder(tmp_path)


@pytest.mark.parametrize("skip_unmasked", [False, True])
def test_missing_or_wrong_masks_folder_is_named(tmp_path, skip_unmasked):
    make_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mask folder not found: .*maskz"):
        MaskedImageFolder(images=tmp_path / "images", masks=tmp_path / "maskz", skip_unmasked=skip_unmasked)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the 4 images in .*images has a mask in .*other"):
        MaskedImageFolder(images=tmp_path / "images", masks=tmp_path / "other", skip_unmasked=skip_unmasked)


def test_unmasked_counts_per_class_and_dropped_class_warning(tmp_path):
    make_folder(tmp_path, classes=("bird", "cat", "dog"), per_class=2)
    (tmp_path / "masks" / "cat" / "0.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class that keeps an image: counted, no warning
        partial = MaskedImageFolder(tmp_path, skip_unmasked=True)
    assert (partial.unmasked, partial.unmasked_by_class, partial.dropped_classes) == (1, {"cat": 1}, [])
    for i in range(2):
        (tmp_path / "masks" / "dog" / f"{i}.png").unlink()
    with pytest.warns(UserWarning, match=r"1 of 3 classes have no usable image .*: dog \(2 image\(s\) without a mask"):
        dataset = MaskedImageFolder(tmp_path, skip_unmasked=True)
    assert (dataset.unmasked, dataset.unmasked_by_class) == (3, {"cat": 1, "dog": 2})
    assert dataset.dropped_classes == ["dog"] and dataset.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    assert len(dataset) == 3 and {s.label for s in dataset.samples} == {0, 1}


def _corrupt_image(root):
    (root / "images" / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return "1.jpg", ValueError


def _truncated_image(root):
    path = root / "images" / "cat" / "1.jpg"
    path.write_bytes(path.read_bytes()[:200])
    return "1.jpg", ValueError


def _wrong_size_mask(root):
    save_mask(root / "masks" / "cat" / "1.png", blob(10, 10))
    return "1.png", ValueError


def _grey_mask(root):
    save_mask(root / "masks" / "cat" / "1.png", blob(*SIZES[0]), scale=7)
    return "1.png", ValueError


def _unreadable_mask(root):
    (root / "masks" / "cat" / "1.png").write_bytes(b"garbage")
    return "1.png", ValueError


@pytest.mark.parametrize("break_it", [_corrupt_image, _truncated_image, _wrong_size_mask, _grey_mask,
                                      _unreadable_mask])
def test_bad_pairs_raise_naming_the_file_or_are_skipped(tmp_path, break_it):
    make_folder(tmp_path)
    name, error = break_it(tmp_path)
    dataset = MaskedImageFolder(tmp_path)
    with pytest.raises(error, match=name):
        dataset[1]
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        dataset = MaskedImageFolder(tmp_path, skip_bad=True)
    assert len(dataset) == 3 and name in dataset.skipped[0]
    assert ("cat", "1.jpg") not in {(s.image.parent.name, s.image.name) for s in dataset.samples}


def test_missing_mask_and_empty_folders(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks" / "cat" / "0.png").unlink()
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(MaskedImageFolder(tmp_path, skip_bad=True)) == 3
    (tmp_path / "images" / "bird").mkdir()
    with pytest.raises(ValueError, match="images/bird holds no images"):
        MaskedImageFolder(tmp_path, skip_unmasked=True)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no class folders"):
        MaskedImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MaskedImageFolder(tmp_path / "nowhere")


def test_unknown_wnid_folder_or_label(tmp_path):
    make_folder(tmp_path, classes=("n01440764", "n99999999"), per_class=1)
    with pytest.raises(ValueError, match=r"images: unknown ImageNet-1k wnid\(s\) \['n99999999'\]"):
        MaskedImageFolder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 .*n99999999"):
        dataset = MaskedImageFolder(tmp_path, skip_bad=True)
    assert dataset.classes == ["n01440764"] and [s.label for s in dataset.samples] == [0]
    assert len(MaskedImageFolder(tmp_path, class_index="folder")) == 2
    (tmp_path / "wnids.csv").write_text("image,mask,label\nimages/n01440764/0.jpg,masks/n01440764/0.png,n01440764\n"
                                        "images/n99999999/0.jpg,masks/n99999999/0.png,n99999999\n")
    with pytest.raises(ValueError, match="wnids.csv: unknown ImageNet-1k wnid"):
        MaskedCsvDataset(tmp_path / "wnids.csv")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [label for *_, label in MaskedCsvDataset(tmp_path / "wnids.csv", skip_bad=True)] == [0]


# -- MaskedCsvDataset --------------------------------------------------------------------------
def test_csv_manifest(tmp_path):
    make_folder(tmp_path)
    rows = ["image,mask,label", "images/cat/0.jpg,masks/cat/0.png,7", "images/dog/1.jpg,masks/dog/1.png,3"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dataset = MaskedCsvDataset(tmp_path / "train.csv")
    assert [label for *_, label in dataset] == [7, 3] and dataset.classes is None
    image, mask, _ = dataset[1]
    assert image.shape[-2:] == mask.shape[-2:] == (SIZES[1][1], SIZES[1][0])

    (tmp_path / "named.csv").write_text("image,mask,label\nimages/cat/0.jpg,masks/cat/0.png,n01443537\n")
    assert MaskedCsvDataset(tmp_path / "named.csv")[0][2] == 1


def test_csv_manifest_bad_input(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cols.csv").write_text("img,mask,label\nimages/cat/0.jpg,masks/cat/0.png,0\n")
    with pytest.raises(ValueError, match=r"cols.csv lacks the column\(s\) \['image'\]"):
        MaskedCsvDataset(tmp_path / "cols.csv")
    (tmp_path / "gone.csv").write_text("image,mask,label\nimages/cat/0.jpg,masks/cat/0.png,0\n"
                                       "images/cat/1.jpg,masks/cat/9.png,0\n")
    with pytest.raises(FileNotFoundError, match=r"gone.csv:3: .*masks/cat/9.png"):
        MaskedCsvDataset(tmp_path / "gone.csv")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(MaskedCsvDataset(tmp_path / "gone.csv", skip_bad=True)) == 1
    (tmp_path / "empty.csv").write_text("image,mask,label\n")
    with pytest.raises(ValueError, match="no usable samples"):
        MaskedCsvDataset(tmp_path / "empty.csv")


# -- paired transforms -------------------------------------------------------------------------
def pattern_pair(width=64, height=48):
    """An image that is white exactly where its (asymmetric) mask is set."""
    mask = np.zeros((height, width), dtype=bool)
    mask[5:30, 8:20] = True
    mask[30:44, 40:60] = True
    image = Image.fromarray(np.repeat(mask[..., None], 3, axis=2).astype(np.uint8) * 255)
    return image, mask


@pytest.mark.parametrize("crop", ["resize_crop", "random_resized"])
def test_train_transform_moves_image_and_mask_together(crop):
    image, mask = pattern_pair()
    transform = PairedTransform(size=(24, 24), mean=(0.0,) * 3, std=(1.0,) * 3, train=True, crop=crop,
                                scale=(0.3, 1.0), hflip=0.5)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(12):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 24, 24) and out_mask.shape == (1, 24, 24)
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        agreement = ((out_image[0] > 0.5) == (out_mask[0] > 0.5)).float().mean()
        assert agreement > 0.93
        flipped += int(out_mask[0, :, :12].sum() < out_mask[0, :, 12:].sum())
    assert 0 < flipped < 12  # both flipped and unflipped draws occurred


def test_eval_transform_and_soft_masks():
    image, mask = pattern_pair()
    binary = PairedTransform(size=(24, 24), mean=(0.0,) * 3, std=(1.0,) * 3)
    first, second = binary(image, mask), binary(image, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # shorter side 48 -> floor(24 / 0.875) = 27, centre crop 24: the mask is the resized mask, cropped
    expected = Image.fromarray(mask.astype(np.uint8)).resize((36, 27), Image.NEAREST)
    offset_h, offset_w = round(3 / 2), round(12 / 2)
    expected = np.asarray(expected)[offset_h:offset_h + 24, offset_w:offset_w + 24]
    assert (first[1][0].numpy() == expected).mean() > 0.97
    soft = PairedTransform(size=(24, 24), mean=(0.0,) * 3, std=(1.0,) * 3, soft_masks=True)(image, mask)[1]
    fractional = (soft > 0) & (soft < 1)
    assert fractional.any() and soft.min() >= 0 and soft.max() <= 1


def test_paired_transforms_for_a_model():
    model = tiny_model("vit_cls")
    image, mask = pattern_pair()
    train = paired_transforms(model, train=True)
    assert train.size == (32, 32) and train.train and train.interpolation == "bicubic"
    out_image, out_mask = train(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (1, 32, 32)
    config = {"input_size": (3, 16, 20), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bilinear"}
    imagenet, half = paired_transforms(config), paired_transforms(config, normalization="half")
    grey = Image.new("RGB", (30, 20), (128, 128, 128))
    flat = np.zeros((20, 30), dtype=bool)
    assert imagenet(grey, flat)[0].shape == (3, 16, 20)
    assert torch.allclose(half(grey, flat)[0], torch.full((3, 16, 20), (128 / 255 - 0.5) / 0.5), atol=1e-5)
    assert torch.allclose(imagenet(grey, flat)[0][0], torch.full((16, 20), (128 / 255 - 0.485) / 0.229), atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        paired_transforms(model, normalization="imagenet")


def test_transform_in_dataset(tmp_path):
    model = tiny_model("vit_cls")
    dataset = MaskedImageFolder(make_folder(tmp_path), paired_transforms(model, train=True, crop="random_resized"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    images, masks, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    assert labels.tolist() == [0, 0, 1, 1]
