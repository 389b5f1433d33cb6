"""ImageNet-S decoding, split and dataset; TokenCut; the ``masks`` command (real on-disk formats)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from conftest import TINY_MODELS, cli_error, tiny_images, tiny_model
from relevance_finetune.cli import main
from relevance_finetune.data import ImageNetSDataset, MaskedImageFolder, imagenet_class_index
from relevance_finetune.masks import (
    MERGED_WNIDS, bilateral_refine, bilateral_solve, decode_imagenet_s_mask, imagenet_s_foreground,
    imagenet_s_split, last_block_keys, tokencut_masks, tokencut_partition, upsample_mask)
from relevance_finetune.masks.automatic import patch_multiple_size

WNIDS = sorted(imagenet_class_index())
CATEGORIES = sorted(set(WNIDS) - set(MERGED_WNIDS))  # category file: sorted wnids, ids are 1-based rows
CLASSES = [WNIDS[i] for i in (600, 2, 300, 0, 601, 1, 301)] + ["n04355933"]  # unsorted on purpose


# -- ImageNet-S fixture ------------------------------------------------------------------------
def encode_ids(ids):
    """ImageNet-S PNG encoding: R = id % 256, G = id // 256."""
    return np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)


def id_map(width, height, class_id):
    ids = np.zeros((height, width), dtype=np.int64)
    ids[3:12, 4:15] = class_id
    ids[:, -2:] = 1000  # ignored region
    return ids


def make_imagenet_s(root, per_class=3, merged_sources=2):
    """ImageNetS919/{train-semi-segmentation, data/...} and imagenet/train in the real layouts."""
    semi, imagenet = root / "ImageNetS919" / "train-semi-segmentation", root / "imagenet" / "train"
    lines = []
    for folder in CLASSES:
        names = [f"{folder}_{100 + i}" for i in range(per_class)]
        if folder == "n04355933":
            names += [f"n04356056_{200 + i}" for i in range(merged_sources)]
        for i, name in enumerate(names):
            width, height = 20 + i, 16
            source = name.split("_")[0]
            (imagenet / source).mkdir(parents=True, exist_ok=True)
            (semi / folder).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(imagenet / source / f"{name}.JPEG")
            ids = id_map(width, height, CATEGORIES.index(folder) + 1)
            Image.fromarray(encode_ids(ids)).save(semi / folder / f"{name}.png")
            lines.append(f"{folder}/{name}.JPEG {folder}/{name}.png")
    data = root / "ImageNetS919" / "data"
    (data / "names").mkdir(parents=True)
    (data / "categories").mkdir(parents=True)
    (data / "names" / "ImageNetSemi_im919_train.txt").write_text("\n".join(lines) + "\n")
    (data / "categories" / "ImageNetS_categories_im919.txt").write_text("\n".join(CATEGORIES) + "\n")
    return dict(root=root / "ImageNetS919", imagenet=root / "imagenet",
                list_file=data / "names" / "ImageNetSemi_im919_train.txt",
                categories_file=data / "categories" / "ImageNetS_categories_im919.txt")


@pytest.fixture
def imagenet_s(tmp_path):
    return make_imagenet_s(tmp_path)


def test_decode_ids_above_255_and_ignored(tmp_path):
    ids = id_map(20, 16, 700)
    Image.fromarray(encode_ids(ids)).save(tmp_path / "m.png")
    decoded = decode_imagenet_s_mask(tmp_path / "m.png")
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, ids)
    np.testing.assert_array_equal(imagenet_s_foreground(decoded, 700), ids == 700)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="grey.png"):
        decode_imagenet_s_mask(tmp_path / "grey.png")


def test_foreground_checks_ids():
    ids = id_map(20, 16, 5)
    with pytest.raises(ValueError, match=r"m.png holds foreground ids \[5\], expected only id 6"):
        imagenet_s_foreground(ids, 6, "m.png")
    ids[0, 0] = 7
    with pytest.raises(ValueError, match="single class id"):
        imagenet_s_foreground(ids)
    assert not imagenet_s_foreground(np.full((3, 3), 1000)).any()


def test_split_is_sorted_and_skips_merged(imagenet_s):
    split = imagenet_s_split(imagenet_s["root"], imagenet_s["imagenet"], num_classes=4, images_per_class=2)
    usable = sorted(set(CLASSES) - {"n04355933"})
    assert split.train_classes == usable[:4] and split.val_classes == usable[4:]
    assert [r.mask.stem for r in split.train[:2]] == [f"{usable[0]}_100", f"{usable[0]}_101"]
    assert len(split.train) == 8 and [r.mask_wnid for r in split.val] == usable[4:]
    assert all(r.image.is_file() and r.mask.is_file() for r in split.train + split.val)
    listed = imagenet_s_split(imagenet_s["root"], imagenet_s["imagenet"], num_classes=4, images_per_class=2,
                              list_file=imagenet_s["list_file"])
    assert listed == split


def test_split_options(imagenet_s):
    def split(**kwargs):
        return imagenet_s_split(imagenet_s["root"], imagenet_s["imagenet"], **kwargs)

    seeded = split(num_classes=3, class_seed=1).train_classes
    assert seeded == split(num_classes=3, class_seed=1).train_classes
    assert seeded != split(num_classes=3).train_classes
    first = sorted(CLASSES)[0]
    assert first not in split(num_classes=6, exclude=[first]).train_classes + split(num_classes=6, exclude=[first]).val_classes
    others = [c for c in CLASSES if c != "n04355933"]
    merged = split(num_classes=1, images_per_class=5, merged="keep", exclude=others).train
    assert [r.wnid for r in merged] == ["n04355933"] * 3 + ["n04356056"] * 2
    assert [r.image.parent.name for r in merged] == [r.wnid for r in merged]
    assert {r.mask.parent.name for r in merged} == {"n04355933"}
    with pytest.raises(ValueError, match="num_classes=8 but 7"):
        split(num_classes=8)
    with pytest.raises(ValueError, match="has 3 masks, 4 requested"):
        split(num_classes=2, images_per_class=4)


def test_imagenet_s_dataset(imagenet_s):
    dataset = ImageNetSDataset(imagenet_s["root"], imagenet_s["imagenet"], "train", num_classes=4,
                               images_per_class=2, categories_file=imagenet_s["categories_file"],
                               merged="keep")
    val = ImageNetSDataset(imagenet_s["root"], imagenet_s["imagenet"], "val", num_classes=4, merged="keep")
    assert len(dataset) == 8 and len(val) == 4
    index = imagenet_class_index()
    assert [label for *_, label in dataset][::2] == [index[w] for w in sorted(CLASSES)[:4]]
    image, mask, _ = dataset[1]
    assert image.shape == (3, 16, 21) and mask.shape == (1, 16, 21)
    np.testing.assert_array_equal(mask[0].numpy(), id_map(21, 16, 7) == 7)  # the rectangle, not 1000
    others = [c for c in CLASSES if c != "n04355933"]
    labels = {s.image.stem: s.label for s in ImageNetSDataset(
        imagenet_s["root"], imagenet_s["imagenet"], "train", num_classes=1, images_per_class=5,
        merged="keep", exclude=others, categories_file=imagenet_s["categories_file"]).samples}
    assert labels["n04356056_200"] == index["n04356056"] and labels["n04355933_100"] == index["n04355933"]


def test_imagenet_s_bad_input(imagenet_s, tmp_path):
    first = sorted(CLASSES)[0]
    semi = imagenet_s["root"] / "train-semi-segmentation"
    other = encode_ids(id_map(20, 16, CATEGORIES.index(first) + 2))
    Image.fromarray(other).save(semi / first / f"{first}_100.png")
    kwargs = dict(num_classes=2, images_per_class=2, categories_file=imagenet_s["categories_file"])
    dataset = ImageNetSDataset(imagenet_s["root"], imagenet_s["imagenet"], **kwargs)
    with pytest.raises(ValueError, match=f"{first}_100.png holds foreground ids"):
        dataset[0]
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(ImageNetSDataset(imagenet_s["root"], imagenet_s["imagenet"], skip_bad=True, **kwargs)) == 3

    (imagenet_s["imagenet"] / "train" / first / f"{first}_101.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=f"expected .*train/{first}/{first}_101.JPEG"):
        ImageNetSDataset(imagenet_s["root"], imagenet_s["imagenet"], **kwargs)

    (semi / "n00000001").mkdir()
    Image.fromarray(other).save(semi / "n00000001" / "n00000001_1.png")
    with pytest.raises(ValueError, match="unknown ImageNet-1k wnid 'n00000001'"):
        ImageNetSDataset(imagenet_s["root"], imagenet_s["imagenet"], num_classes=1, images_per_class=1)


# -- TokenCut ----------------------------------------------------------------------------------
def clustered_features(foreground, dim=16, noise=0.05, seed=0):
    """Patch features: one direction on ``foreground`` patches, an orthogonal one elsewhere."""
    rng = np.random.default_rng(seed)
    features = np.where(foreground.reshape(-1, 1), np.eye(dim)[0], np.eye(dim)[1])
    return torch.from_numpy(features + noise * rng.standard_normal(features.shape))


def test_partition_finds_the_foreground_cluster():
    foreground = np.zeros((6, 7), dtype=bool)
    foreground[1:3, 1:4] = True
    np.testing.assert_array_equal(tokencut_partition(clustered_features(foreground), (6, 7)), foreground)


def test_partition_keeps_the_seed_component_only():
    foreground = np.zeros((6, 7), dtype=bool)
    foreground[0:2, 0:2] = True
    foreground[4:6, 4:7] = True
    result = tokencut_partition(clustered_features(foreground), (6, 7))
    first, second = np.zeros_like(foreground), np.zeros_like(foreground)
    first[0:2, 0:2], second[4:6, 4:7] = True, True
    assert (result == first).all() or (result == second).all()


def test_partition_ignores_the_eigenvector_sign(monkeypatch):
    foreground = np.zeros((5, 5), dtype=bool)
    foreground[1:3, 2:4] = True
    features = clustered_features(foreground)
    eigh = scipy.linalg.eigh
    for sign in (1, -1):
        monkeypatch.setattr(scipy.linalg, "eigh", lambda *a, **k: (lambda w, v: (w, sign * v))(*eigh(*a, **k)))
        np.testing.assert_array_equal(tokencut_partition(features, (5, 5)), foreground)
    with pytest.raises(ValueError, match=r"expected features of shape \(25, C\)"):
        tokencut_partition(features[:-1], (5, 5))
    with pytest.raises(ValueError, match="at least 3 patches"):
        tokencut_partition(features[:2], (1, 2))


def reference_partition(features, grid, tau=0.2, eps=1e-5):
    """TokenCut's published Ncut step, written independently in float64 NumPy."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    affinity = np.where(unit @ unit.T > tau, 1.0, eps)
    degree = np.diag(affinity.sum(axis=1))
    _, vectors = scipy.linalg.eigh(degree - affinity, degree, subset_by_index=[1, 2])
    second = vectors[:, 0]
    foreground = second > second.sum() / len(second)
    seed = np.argmax(np.abs(second))
    foreground = foreground if foreground[seed] else ~foreground
    labels, _ = scipy.ndimage.label(foreground.reshape(grid))
    return labels == labels[np.unravel_index(seed, grid)]


@pytest.mark.parametrize("seed, grid", [(4, (3, 3)), (0, (4, 5)), (1, (6, 6)), (2, (2, 7))])
def test_partition_matches_the_float64_reference(seed, grid):
    # seed 4: the eigenvector's largest |x| is nearly tied, so single precision picks another seed
    features = np.random.default_rng(seed).normal(size=(grid[0] * grid[1], 8))
    np.testing.assert_array_equal(tokencut_partition(features, grid), reference_partition(features, grid))
    np.testing.assert_array_equal(tokencut_partition(torch.from_numpy(features), grid),
                                  reference_partition(features, grid))


def test_last_block_keys_match_the_attention_keys(model_key):
    model = tiny_model(model_key)
    images = tiny_images(model)
    attn = model.blocks[-1].attn
    captured = []
    if model_key == "beit":  # BEiT adds its (zero) k bias inside F.linear: compare to q, k, v from qkv
        hook = attn.register_forward_pre_hook(lambda m, args: captured.append(
            (args[0] @ m.qkv.weight.T).unflatten(-1, (3, m.num_heads, -1))[:, :, 1]))
    else:
        hook = attn.k_norm.register_forward_hook(lambda m, args, out: captured.append(out.transpose(1, 2)))
    keys, grid = last_block_keys(model, images)
    hook.remove()
    gh, gw = model.patch_embed.grid_size
    assert grid == (gh, gw) and keys.shape == (2, gh * gw, 32)
    expected = captured[0][:, model.num_prefix_tokens:].flatten(2)
    torch.testing.assert_close(keys, expected)


def test_tokencut_masks_on_synthetic_images():
    model = tiny_model("vit_cls", num_classes=0)
    images = torch.full((2, 3, 32, 32), -1.0)
    images[0, :, 8:24, 8:16] = 1.0
    images[1, :, 0:8, :] = 1.0
    masks = tokencut_masks(model, images)
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.bool
    blocks = masks.reshape(2, 4, 8, 4, 8)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant on each 8x8 patch: nearest upsampling
    assert masks.flatten(1).any(1).all() and not masks.flatten(1).all(1).any()
    assert tokencut_masks(model, images, size=(40, 48)).shape == (2, 40, 48)


def test_tokencut_rejects_non_transformers():
    with pytest.raises(TypeError, match="Sequential has no `blocks"):
        tokencut_masks(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), torch.zeros(1, 3, 8, 8))


# -- bilateral solver --------------------------------------------------------------------------
def dense_bilateral_solve(image, target, spatial, luma, chroma, lam=256.0, confidence=0.999):
    """Barron & Poole's solver as published, with dense matrices and an exact solve (tiny images)."""
    r, g, b = np.moveaxis(image.astype(np.float64), -1, 0)
    y, u, v = (0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
               0.5 * r - 0.418688 * g - 0.081312 * b + 128)
    rows, cols = np.indices(target.shape)
    scaled = np.stack([cols / spatial, rows / spatial, y / luma, u / chroma, v / chroma], -1).reshape(-1, 5)
    pixels = [tuple(p) for p in np.floor(scaled).astype(int)]
    vertex = {p: i for i, p in enumerate(sorted(set(pixels)))}
    splat = np.zeros((len(vertex), len(pixels)))
    splat[[vertex[p] for p in pixels], np.arange(len(pixels))] = 1
    blur = 10 * np.eye(len(vertex))  # [1 2 1] along each of the 5 axes
    for p, i in vertex.items():
        for axis in range(5):
            for step in (-1, 1):
                neighbour = p[:axis] + (p[axis] + step,) + p[axis + 1:]
                if neighbour in vertex:
                    blur[i, vertex[neighbour]] += 1
    counts, n = splat.sum(1), np.ones(len(vertex))
    for _ in range(10):
        n = np.sqrt(n * counts / (blur @ n))
    weights = np.full(len(pixels), confidence)
    system = lam * (np.diag(n * (blur @ n)) - np.diag(n) @ blur @ np.diag(n)) + np.diag(splat @ weights)
    return (splat.T @ np.linalg.solve(system, splat @ (weights * target.ravel()))).reshape(target.shape)


def object_image(size=64, noise=6.0, seed=0):
    """A red rectangle (not on the 8-pixel grid) on green, with noise; returns the image and the object."""
    obj = np.zeros((size, size), dtype=bool)
    obj[13:45, 10:50] = True
    image = np.where(obj[..., None], [200.0, 60.0, 50.0], [40.0, 100.0, 40.0])
    image += noise * np.random.default_rng(seed).standard_normal(image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), obj


def test_bilateral_solve_matches_a_dense_exact_solve():
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (3, 4, 3)), 4, axis=0), 3, axis=1).astype(np.uint8)
    image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    target = rng.uniform(size=image.shape[:2])
    expected = dense_bilateral_solve(image, target, 3, 48, 40)
    np.testing.assert_allclose(bilateral_solve(image, target, sigma_spatial=3, sigma_luma=48, sigma_chroma=40),
                               expected, atol=1e-4)


def test_bilateral_solve_keeps_constants():
    image, _ = object_image()
    np.testing.assert_allclose(bilateral_solve(image, np.full(image.shape[:2], 0.3)), 0.3, atol=1e-9)
    flat = np.full((8, 9, 3), 77, dtype=np.uint8)
    np.testing.assert_allclose(bilateral_solve(flat, np.full((8, 9), 0.7), confidence=np.ones((8, 9))), 0.7)


def test_bilateral_refine_snaps_a_blocky_mask_to_the_object_edge():
    image, obj = object_image()
    coarse = upsample_mask(obj.reshape(8, 8, 8, 8).mean((1, 3)) > 0.5, obj.shape)  # the 8x8 patch grid
    assert (coarse != obj).sum() > 300
    refined = bilateral_refine(image, coarse)
    assert refined.dtype == bool and refined.shape == obj.shape
    np.testing.assert_array_equal(refined, obj)
    np.testing.assert_array_equal(bilateral_refine(image, coarse), refined)  # deterministic
    np.testing.assert_array_equal(bilateral_refine(image, coarse, component="largest"), obj)


def test_bilateral_refine_reference_rules():
    image, obj = object_image()
    # an object larger than the background: the reference's rule takes the background, whose IoU
    # with the coarse mask is under 0.5, so the mask is dropped; 'largest' keeps the object
    big = ~np.pad(np.ones((52, 52), dtype=bool), 6)
    big_image = np.where(big[..., None], image[0, 0], image[30, 30]).astype(np.uint8)
    assert big.mean() < 0.5 and bilateral_refine(big_image, ~big) is None
    np.testing.assert_array_equal(bilateral_refine(big_image, ~big, component="largest"), ~big)
    # a constant image with a full mask: one component, again larger than the background: dropped
    flat = np.full((16, 16, 3), 90, dtype=np.uint8)
    assert bilateral_refine(flat, np.ones((16, 16), dtype=bool)) is None
    # nothing above 0.5: the reference falls back to the whole image, here of IoU 1/16 with the mask
    corner = np.zeros((64, 64), dtype=bool)
    corner[:16, :16] = True
    flat = np.full((64, 64, 3), 90, dtype=np.uint8)
    assert bilateral_solve(flat, corner).max() < 0.5
    assert bilateral_refine(flat, corner) is None and bilateral_refine(flat, corner, min_iou=0.0625).all()
    assert bilateral_refine(flat, corner, component="largest", min_iou=0) is not None
    assert not bilateral_refine(flat, corner, component="largest", min_iou=0).any()


def test_bilateral_bad_input():
    image, obj = object_image()
    with pytest.raises(ValueError, match=r"expected an RGB image \(H, W, 3\) and a target \(H, W\)"):
        bilateral_refine(image, obj[:-1])
    with pytest.raises(ValueError, match="must be positive"):
        bilateral_solve(image, obj, sigma_spatial=0)
    with pytest.raises(ValueError, match="non-negative"):
        bilateral_solve(image, obj, confidence=-1)
    with pytest.raises(ValueError, match="component must be"):
        bilateral_refine(image, obj, component="biggest")


# -- the masks command -------------------------------------------------------------------------
@pytest.fixture
def dino_dir(tmp_path):
    """A tiny headless ViT saved like a hub checkpoint, loadable as ``local-dir:``."""
    _, kwargs = TINY_MODELS["vit_cls"]
    model = tiny_model("vit_cls", num_classes=0)
    save_for_hf(model, str(tmp_path / "dino"), model_args=dict(kwargs, num_classes=0))
    return tmp_path / "dino"


def make_images(root, sizes=((40, 30), (33, 50), (32, 32), (45, 41), (60, 20))):
    for i, (width, height) in enumerate(sizes):
        pixels = np.full((height, width, 3), 30, dtype=np.uint8)
        pixels[height // 4: height // 2, width // 3:] = 220
        folder = root / ("n01440764" if i % 2 else "n01443537")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img_{i}.JPEG")
    return root


def masks_command(dino_dir, images, out, *extra):
    return main(["masks", "--debug", "--method", "tokencut", "--model", f"local-dir:{dino_dir}", "--pretrained",
                 "--images", str(images), "--out", str(out), "--workers", "0", "--batch-size", "2",
                 "--min-pixels", "0", *extra])


def test_masks_command_round_trips_and_resumes(tmp_path, dino_dir, capsys):
    images = make_images(tmp_path / "images")
    assert masks_command(dino_dir, images, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "5 masks written" in out and f"outlined: {tmp_path / 'out' / 'preview.png'}" in out
    with Image.open(tmp_path / "out" / "preview.png") as preview:
        assert preview.format == "PNG"
    dataset = MaskedImageFolder(images=images, masks=tmp_path / "out")
    assert len(dataset) == 5 and dataset.classes == ["n01440764", "n01443537"]
    for sample in dataset.samples:
        image, mask = dataset.load(sample)
        assert mask.shape == (image.height, image.width) and mask.any()
    assert sorted(p.name for p in (tmp_path / "out" / "n01440764").iterdir()) == ["img_1.png", "img_3.png"]

    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/*.png")}
    assert masks_command(dino_dir, images, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "0 masks written" in out and "5 already there" in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/*.png")} == written


def test_masks_command_shards_and_min_pixels(tmp_path, dino_dir, capsys, monkeypatch):
    images = make_images(tmp_path / "images")
    assert masks_command(dino_dir, images, tmp_path / "a", "--shard", "1/2") == 0
    # classes in sorted order: n01440764 (img_1, img_3), n01443537 (img_0, img_2, img_4); shard 1/2 takes [1::2]
    assert sorted(p.name for p in (tmp_path / "a").glob("*/*.png")) == ["img_2.png", "img_3.png"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert masks_command(dino_dir, images, tmp_path / "a") == 0
    assert len(list((tmp_path / "a").glob("*/*.png"))) == 5
    capsys.readouterr()
    assert masks_command(dino_dir, images, tmp_path / "b", "--min-pixels", "100000", "--shard", "0/1") == 0
    out = capsys.readouterr().out
    assert "0 masks written" in out and "5 under --min-pixels" in out and not list((tmp_path / "b").glob("*/*.png"))
    with pytest.raises(ValueError, match="--shard must look like i/n"):
        masks_command(dino_dir, images, tmp_path / "b", "--shard", "2")


def test_masks_command_bad_images(tmp_path, dino_dir, capsys):
    images = make_images(tmp_path / "images")
    (images / "n01440764" / "img_1.JPEG").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="img_1.JPEG"):
        masks_command(dino_dir, images, tmp_path / "out")
    with pytest.warns(UserWarning, match="img_1.JPEG"):
        assert masks_command(dino_dir, images, tmp_path / "out", "--skip-bad") == 0
    assert "1 bad images skipped" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no class folders"):
        masks_command(dino_dir, tmp_path / "empty", tmp_path / "out")


def test_patch_multiple_size():
    assert patch_multiple_size(333, 500, (16, 16)) == (336, 496)
    assert patch_multiple_size(24, 40, (16, 16)) == (32, 32)  # round half to even, as TokenCut's int(round())
    assert patch_multiple_size(5, 70, (16, 8)) == (16, 72)  # at least one patch
    assert patch_multiple_size(300, 500, (16, 16), short_side=224) == (224, 368)


def test_masks_command_refines_then_filters(tmp_path, dino_dir, capsys, monkeypatch):
    import relevance_finetune.masks.automatic as automatic
    images = make_images(tmp_path / "images")
    seen = []

    def refine(image, mask, component):  # 10 foreground pixels, or dropped for the 40x30 image
        seen.append((image, mask, component))
        if image.shape[:2] == (30, 40):
            return None
        refined = np.zeros(mask.shape, dtype=bool)
        refined.flat[:10] = True
        return refined

    monkeypatch.setattr(automatic, "bilateral_refine", refine)
    assert masks_command(dino_dir, images, tmp_path / "a", "--min-pixels", "11") == 0
    assert "0 masks written" in capsys.readouterr().out
    assert masks_command(dino_dir, images, tmp_path / "b", "--min-pixels", "10", "--component", "largest") == 0
    out = capsys.readouterr().out
    assert "4 masks written" in out and "1 dropped by the refinement" in out and "0 under" in out
    assert all(m.sum() == 10 for m in (np.array(Image.open(p)) > 0 for p in (tmp_path / "b").glob("*/*.png")))
    image, mask, component = seen[-1]
    np.testing.assert_array_equal(image, np.array(Image.open(images / "n01443537" / "img_4.JPEG")))
    assert mask.shape == (20, 60) and mask.dtype == bool and component == "largest"


def test_masks_command_refine_none_and_aspect_resize(tmp_path, dino_dir, capsys, monkeypatch):
    images = make_images(tmp_path / "images")
    shapes = []
    monkeypatch.setattr("relevance_finetune.masks.automatic.last_block_keys",
                        lambda model, batch: shapes.append(tuple(batch.shape)) or last_block_keys(model, batch))
    assert masks_command(dino_dir, images, tmp_path / "a", "--refine", "none") == 0
    assert "5 masks written" in capsys.readouterr().out and set(shapes) == {(2, 3, 32, 32), (1, 3, 32, 32)}
    shapes.clear()
    assert masks_command(dino_dir, images, tmp_path / "b", "--resize", "aspect", "--refine", "none") == 0
    # (H, W) 30x40 -> 32x40, 50x33 -> 48x32, 32x32, 41x45 -> 40x48, 20x60 -> 16x64, one forward per size
    assert sorted(s[2:] for s in shapes) == [(16, 64), (32, 32), (32, 40), (40, 48), (48, 32)]
    for path in (tmp_path / "b").glob("*/*.png"):
        image = Image.open(images / path.parent.name / f"{path.stem}.JPEG")
        assert Image.open(path).size == image.size
    shapes.clear()
    assert masks_command(dino_dir, images, tmp_path / "c", "--resize", "aspect", "--short-side", "16",
                         "--refine", "none") == 0
    assert (1, 3, 16, 24) in shapes  # 30x40 -> 16x21.3 -> 16x24
    with pytest.raises(ValueError, match="--short-side takes a positive size and needs --resize aspect"):
        masks_command(dino_dir, images, tmp_path / "d", "--short-side", "16")
    assert "--resize aspect needs a model that takes dynamic_img_size" in cli_error(
        capsys, ["masks", "--model", "beit_base_patch16_224", "--images", str(images), "--out", str(tmp_path / "e"),
                 "--resize", "aspect"])


def test_masks_command_uses_the_weights_of_a_local_dir_model(tmp_path, dino_dir, monkeypatch, capsys):
    """``local-dir:DIR`` means DIR's weights without --pretrained: the same masks from two runs."""
    from relevance_finetune.masks import automatic

    images = make_images(tmp_path / "images")
    saved = timm.create_model(f"local-dir:{dino_dir}", pretrained=True).state_dict()
    used = []

    def recording(model, batch):
        used.append(model.state_dict())
        return last_block_keys(model, batch)

    monkeypatch.setattr(automatic, "last_block_keys", recording)
    for seed in (0, 1):  # a random initialisation would differ between the two runs
        torch.manual_seed(seed)
        assert main(["masks", "--model", f"local-dir:{dino_dir}", "--images", str(images), "--out",
                     str(tmp_path / str(seed)), "--workers", "0", "--min-pixels", "0", "--refine", "none"]) == 0
    assert "random weights" not in capsys.readouterr().err
    assert used and all(torch.equal(state[k], saved[k]) for state in used for k in saved)
    written = [sorted(p.relative_to(tmp_path / str(seed)) for p in (tmp_path / str(seed)).glob("*/*.png"))
               for seed in (0, 1)]
    assert written[0] == written[1] and written[0]
    for path in written[0]:
        first, second = (np.asarray(Image.open(tmp_path / seed / path)) for seed in "01")
        assert np.array_equal(first, second)


def test_masks_command_warns_of_random_weights_nobody_asked_for(tmp_path, capsys):
    images = make_images(tmp_path / "images", sizes=((32, 32),))
    _, kwargs = TINY_MODELS["vit_cls"]
    args = ["masks", "--model", "vit_tiny_patch16_224", "--model-kwargs", *(f"{k}={v}" for k, v in kwargs.items()),
            "--images", str(images), "--workers", "0", "--min-pixels", "0", "--refine", "none"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "random weights (pass --random-weights if that is meant)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--random-weights"]) == 0
    assert "random weights" not in capsys.readouterr().err
