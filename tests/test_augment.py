import pytest
import torch

from relevance_finetune.augment import BackgroundSwap, fill_object


def _batch(n: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a distinct constant background colour each and a noisy square object."""
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone() / n
    masks = torch.zeros(n, size, size)
    for i in range(n):
        top = 2 + i % 5
        masks[i, top:top + 6, 3:3 + 7] = 1
    images = torch.where(masks[:, None] > 0, torch.rand(n, 3, size, size, generator=generator) + 5, images)
    return images, masks


def test_objects_kept_backgrounds_from_other_images():
    images, masks = _batch()
    out, out_masks = BackgroundSwap(p=1.0, seed=0)(images, masks)
    assert torch.equal(out_masks, masks)
    inside = masks[:, None].expand_as(images) > 0
    assert torch.equal(out[inside], images[inside])  # object pixels unchanged
    for i in range(len(images)):
        background = out[i][~inside[i]]
        # every background pixel is a constant other image's colour (objects are > 5)
        assert background.max() < 1 and torch.allclose(background, background[0].expand_as(background))
        assert not torch.isclose(background[0], images[i, 0, 0, 0] if masks[i, 0, 0] == 0 else images[i, 0, -1, -1])


def test_donor_hole_is_filled_not_copied():
    images, masks = _batch()
    out, _ = BackgroundSwap(p=1.0, seed=1)(images, masks)
    assert out[masks[:, None].expand_as(images) == 0].max() < 1  # no donor object pixel leaks in


def test_probability_zero_and_seeding():
    images, masks = _batch()
    out, _ = BackgroundSwap(p=0.0, seed=0)(images, masks)
    assert torch.equal(out, images)
    a, _ = BackgroundSwap(p=0.5, seed=3)(images, masks)
    b, _ = BackgroundSwap(p=0.5, seed=3)(images, masks)
    assert torch.equal(a, b)
    swap = BackgroundSwap(p=0.5, seed=3)
    for _ in range(20):
        swap(images, masks)
    assert 0.35 < swap.swapped / (20 * len(images)) < 0.65


def test_object_only():
    images, masks = _batch()
    swap = BackgroundSwap(p=0.0, object_only=1.0, seed=0)
    out, _ = swap(images, masks)
    inside = masks[:, None].expand_as(images) > 0
    assert torch.equal(out[inside], images[inside])
    colour = images[~inside].mean()
    assert torch.allclose(out[~inside], colour.expand_as(out[~inside]))
    assert swap.object_only_count == len(images)


def test_unusable_masks_are_skipped_and_counted():
    images, masks = _batch()
    masks[0] = 0
    masks[1] = 1
    swap = BackgroundSwap(p=1.0, seed=0)
    with pytest.warns(UserWarning, match="2 of 6 images"):
        out, _ = swap(images, masks)
    assert swap.skipped == 2 and swap.swapped == 4
    assert torch.equal(out[:2], images[:2])
    single = BackgroundSwap(p=1.0, seed=0)
    out, _ = single(images[:1].clone(), masks[2:3])
    assert torch.equal(out, images[:1]) and single.swapped == 0


def test_soft_masks_composite_linearly():
    images, masks = _batch(2)
    masks = masks * 0.5
    out, _ = BackgroundSwap(p=1.0, seed=0)(images, masks)
    filled = fill_object(images.flip(0), masks.flip(0))
    expected = images * masks[:, None] + filled * (1 - masks[:, None])
    assert torch.allclose(out, expected)


def test_fill_object_inpaints_gradients():
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = x.expand(1, 3, 32, 32).clone()
    mask = ((x - 0.5).abs() < 0.15) & ((y - 0.5).abs() < 0.15)
    image[:, :, mask] = 9.0
    inpainted = fill_object(image, mask[None].float())
    mean = fill_object(image, mask[None].float(), "mean")
    hole = mask.expand(1, 3, 32, 32)
    assert (inpainted[hole] - x.expand(1, 3, 32, 32)[hole]).abs().max() < 0.12  # continues the ramp
    assert inpainted[~hole].equal(image[~hole]) and mean[hole].max() < 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=1.5), "p must lie in"), (dict(object_only=-0.1), "object_only must lie in"),
    (dict(fill="zeros"), "fill must be"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackgroundSwap(**kwargs)


def test_bad_masks():
    images, masks = _batch()
    with pytest.raises(ValueError, match="do not match"):
        BackgroundSwap()(images, masks[:, :8])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BackgroundSwap()(images, masks * 2)
