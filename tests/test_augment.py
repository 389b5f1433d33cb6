import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from relevance_finetune.augment import BackgroundSwap, fill_object, usable_masks
from relevance_finetune.checkpoint import load_checkpoint, save_checkpoint


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
    with pytest.warns(UserWarning, match="could not be swapped.* 0 buffered"):
        out, _ = single(images[:1].clone(), masks[2:3])
    assert torch.equal(out, images[:1]) and single.swapped == 0 and single.unswapped == 1


def test_usable_masks_need_object_and_background():
    masks = torch.zeros(5, 1, 4, 4)
    masks[1] = 1
    masks[2, 0, :2] = 1
    masks[3] = 0.5  # soft: a bit of both everywhere
    masks[4, 0, 0, 0] = 0.01
    assert usable_masks(masks).tolist() == [False, False, True, True, True]
    assert usable_masks(masks[:, 0]).tolist() == [False, False, True, True, True]
    assert usable_masks(masks[:0]).shape == (0,)
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, 1, H, W\), got \(5, 2, 4, 4\)"):
        usable_masks(masks.expand(5, 2, 4, 4))


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
    (dict(fill="zeros"), "fill must be"), (dict(buffer_size=-1), "buffer_size must be"),
    (dict(buffer_size=2.5), "buffer_size must be"),
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


# -- donors across calls: batches of one ---------------------------------------------------------------
def _background(image: torch.Tensor, mask: torch.Tensor) -> float:
    """The constant background colour of a ``_batch`` image (its objects are > 5)."""
    values = image[:, mask == 0]
    assert values.max() < 1 and torch.allclose(values, values[0, 0].expand_as(values))
    return float(values[0, 0])


def _one_at_a_time(swap: BackgroundSwap, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``swap`` applied to micro-batches of one image, as gradient accumulation or one image per GPU does."""
    return torch.cat([swap(images[i:i + 1], masks[i:i + 1])[0] for i in range(len(images))])


def test_batch_of_one_swaps_from_the_second_call():
    images, masks = _batch()
    swap = BackgroundSwap(p=1.0, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _one_at_a_time(swap, images, masks)
    assert torch.equal(out[0], images[0])  # nothing seen yet: the one call allowed to miss
    assert len(caught) == 1 and "could not be swapped" in str(caught[0].message)
    inside = masks[:, None].expand_as(images) > 0
    assert torch.equal(out[inside], images[inside])  # objects kept
    colours = [_background(images[i], masks[i]) for i in range(len(images))]
    for i in range(1, len(images)):
        assert _background(out[i], masks[i]) in colours[:i]  # an earlier image's background, never its own
    assert (swap.swapped, swap.unswapped) == (len(images) - 1, 1)


def test_micro_batches_of_one_over_steps_keep_swapping_and_warn_once():
    images, masks = _batch()
    swap = BackgroundSwap(p=1.0, seed=0, buffer_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # four optimiser steps of six micro-batches of one
            out = _one_at_a_time(swap, images, masks)
    assert len(caught) == 1
    assert swap.swapped == 4 * len(images) - 1 and swap.unswapped == 1 and len(swap.buffer) == 3
    assert all(_background(out[i], masks[i]) != _background(images[i], masks[i]) for i in range(len(images)))


def test_buffer_never_gives_an_image_its_own_background():
    images, masks = _batch(1)
    swap = BackgroundSwap(p=1.0, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [swap(images, masks)[0] for _ in range(5)]  # a one-image data set
    assert all(torch.equal(out, images) for out in outs) and swap.unswapped == 5 and swap.swapped == 0
    assert len(caught) == 2 and "1 buffered" in str(caught[1].message)  # empty buffer, then only itself


def test_unusable_masks_warn_once_with_the_count():
    images, masks = _batch(2)
    swap = BackgroundSwap(p=1.0, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out, _ = swap(images, torch.ones_like(masks))  # every mask covers the whole image
    assert torch.equal(out, images) and swap.skipped == 6 and swap.swapped == 0
    assert len(caught) == 1 and "2 of 2 images" in str(caught[0].message)


def test_buffer_leaves_batches_of_two_or_more_unchanged():
    images, masks = _batch()
    fresh = BackgroundSwap(p=0.7, object_only=0.5, seed=5)
    used = BackgroundSwap(p=0.7, object_only=0.5, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _one_at_a_time(used, images.flip(0), masks.flip(0))
    used.generator.set_state(fresh.generator.get_state())
    assert len(used.buffer) == len(images)
    assert torch.equal(used(images, masks)[0], fresh(images, masks)[0])


def test_buffer_is_detached_bounded_and_on_the_batch_device():
    images, masks = _batch()
    images.requires_grad_(True)
    swap = BackgroundSwap(p=1.0, seed=0, buffer_size=4)
    out, _ = swap(images, masks)
    assert len(swap.buffer) == 4 and not any(image.requires_grad for image, _ in swap.buffer)
    assert torch.equal(swap.buffer[0][0], images[2].detach())  # the newest four
    out.sum().backward()  # the output still carries the gradient
    assert images.grad is not None


@pytest.mark.parametrize("seed", [3, None])
def test_state_dict_round_trip_repeats_the_next_outputs(tmp_path, seed):
    images, masks = _batch()
    swap = BackgroundSwap(p=0.8, object_only=0.5, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _one_at_a_time(swap, images, masks)
    saved = swap.state_dict()
    save_checkpoint(tmp_path / "state.safetensors", nn.Linear(1, 1), {}, {"swap": saved})
    global_rng = torch.get_rng_state()
    expected = [_one_at_a_time(swap, images.roll(k, 0), masks.roll(k, 0)) for k in range(3)]
    restored = BackgroundSwap(p=0.8, object_only=0.5, seed=seed)
    restored.load_state_dict(load_checkpoint(tmp_path / "state.safetensors")[2]["swap"])
    torch.set_rng_state(global_rng)
    assert restored.state_dict()["counts"] == saved["counts"] and len(restored.buffer) == len(images)
    for k, out in enumerate(expected):
        assert torch.equal(_one_at_a_time(restored, images.roll(k, 0), masks.roll(k, 0)), out)
    assert restored.state_dict()["counts"] == swap.state_dict()["counts"]
    with pytest.raises(ValueError, match="not a BackgroundSwap state"):
        restored.load_state_dict({"buffer": []})


def _ddp_worker(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    """One image per process: each process swaps its own micro-batches of one from its buffer."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        images, masks = _batch(8)
        shard = list(range(rank, len(images), world_size))  # as DistributedSampler(shuffle=False) splits
        swap = BackgroundSwap(p=1.0, seed=rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [swap(images[i:i + 1], masks[i:i + 1])[0][0] for i in shard]
        donors = [_background(out, masks[i]) for out, i in zip(outs, shard)]
        result = {"swapped": swap.swapped, "unswapped": swap.unswapped, "warnings": len(caught),
                  "own": [_background(images[i], masks[i]) for i in shard], "donors": donors}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_with_one_image_each_swap(tmp_path):
    out = tmp_path / "result.json"
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True,
                       start_method=start_method)
    for result in json.loads(out.read_text()):
        assert (result["swapped"], result["unswapped"], result["warnings"]) == (3, 1, 1)
        assert result["donors"][0] == result["own"][0]  # the first call: an empty buffer
        for k in range(1, 4):
            assert result["donors"][k] in result["own"][:k]  # a background this process saw before
