"""TokenCut (Wang et al., 2022): unsupervised foreground masks from a self-supervised ViT.

The keys of the last attention block (heads concatenated, prefix tokens dropped) form a graph
with edges ``cos > tau`` (weight 1, else ``eps``); the second-smallest generalised eigenvector
of ``(D - A) x = lambda D x`` splits the patches at its mean. The side holding the largest
``|x|`` (the seed) is the foreground, and only its connected component containing the seed is
kept. Upsampled nearest to the image size.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["last_block_keys", "patch_grid", "tokencut_masks", "tokencut_partition", "upsample_mask"]


def _last_attention(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not (hasattr(attn, "qkv") or hasattr(attn, "k_proj")):
        raise TypeError(
            f"{type(model).__name__} has no `blocks[-1].attn` with a `qkv` or `k_proj` projection: "
            "TokenCut needs a timm vision transformer (ViT, DeiT, BEiT, EVA, DINO checkpoints)")
    return attn


def _keys(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Keys (B, N, heads * head_dim) of attention module ``attn`` for its input ``x`` (B, N, C)."""
    if getattr(attn, "qkv", None) is not None:
        dim = attn.qkv.out_features // 3
        # fused bias, or BEiT/EVA's separate (zero) k_bias, or none
        bias = attn.qkv.bias[dim:2 * dim] if attn.qkv.bias is not None else getattr(attn, "k_bias", None)
        keys = F.linear(x, attn.qkv.weight[dim:2 * dim], bias)
    else:
        keys = attn.k_proj(x)
    keys = keys.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # B, heads, N, head_dim
    if hasattr(attn, "k_norm"):
        keys = attn.k_norm(keys)
    return keys.transpose(1, 2).flatten(2)


def patch_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of patches ``model.patch_embed`` makes of an image of ``size`` (H, W)."""
    patch_embed = model.patch_embed
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size(tuple(size)))
    return tuple(patch_embed.grid_size)


@torch.no_grad()
def last_block_keys(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch-token keys of the last attention block and the patch grid.

    Returns keys (B, gh * gw, heads * head_dim), prefix tokens (class, distillation, register)
    dropped, and ``(gh, gw)``. Runs ``model.forward_features`` once with a pre-hook.
    """
    attn = _last_attention(model)
    captured: list[torch.Tensor] = []
    hook = attn.register_forward_pre_hook(lambda module, args: captured.append(_keys(module, args[0])))
    try:
        model.forward_features(images)
    finally:
        hook.remove()
    grid = patch_grid(model, tuple(images.shape[-2:]))
    keys = captured[0][:, int(getattr(model, "num_prefix_tokens", 0)):]
    if keys.shape[1] != grid[0] * grid[1]:
        raise RuntimeError(f"{keys.shape[1]} patch keys do not fill the {grid[0]}x{grid[1]} grid")
    return keys, grid


def tokencut_partition(
        features: torch.Tensor | np.ndarray,
        grid: tuple[int, int],
        tau: float = 0.2,
        eps: float = 1e-5,
) -> np.ndarray:
    """TokenCut foreground (gh, gw) bool of one image's patch features (gh * gw, C)."""
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.ndim != 2 or features.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"expected features of shape ({grid[0] * grid[1]}, C) for grid {grid}, "
                         f"got {tuple(features.shape)}")
    if features.shape[0] < 3:
        raise ValueError(f"TokenCut needs at least 3 patches, the grid {grid} has {features.shape[0]}")
    features = F.normalize(features, dim=1)
    # float64 throughout, and the reference's eigenpair subset: the vector is the same to the
    # last bits, which decides the seed where the largest |x| is nearly tied
    affinity = np.where((features @ features.T > tau).numpy(), 1.0, eps)
    degree = np.diag(affinity.sum(axis=1))
    _, vectors = scipy.linalg.eigh(degree - affinity, degree, subset_by_index=[1, 2])
    vector = vectors[:, 0]
    partition = vector > vector.mean()
    seed = int(np.argmax(np.abs(vector)))
    if not partition[seed]:
        partition = ~partition
    components, _ = scipy.ndimage.label(partition.reshape(grid))
    return components == components.flat[seed]


def upsample_mask(partition: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a (gh, gw) bool partition to ``size`` (H, W)."""
    grid = torch.from_numpy(np.ascontiguousarray(partition, dtype=np.float32))[None, None]
    return F.interpolate(grid, size=tuple(int(s) for s in size), mode="nearest")[0, 0].numpy() > 0.5


def tokencut_masks(
        model: nn.Module,
        images: torch.Tensor,
        tau: float = 0.2,
        eps: float = 1e-5,
        size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """TokenCut foreground masks (B, H, W) bool for normalised ``images`` (B, 3, H, W).

    ``model`` is any timm ViT (a DINO checkpoint such as ``vit_small_patch16_224.dino`` as in
    the paper); ``size`` (default: the images' size) is the output size, reached by nearest
    upsampling of the patch-grid partition.
    """
    keys, grid = last_block_keys(model, images)
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    return torch.from_numpy(np.stack([
        upsample_mask(tokencut_partition(k, grid, tau, eps), size) for k in keys.float().cpu()]))
