"""Fast bilateral solver (Barron & Poole, ECCV 2016) and TokenCut's mask refinement with it.

A bilateral grid gives each pixel a vertex ``floor((x, y) / sigma_spatial, Y / sigma_luma,
(U, V) / sigma_chroma)`` in a 5-D grid (JPEG YUV, chroma offset by 128); the splat matrix ``S``
(vertices, pixels) sums pixels into their vertex and its transpose slices back. The blur ``B``
is a [1 2 1] kernel along each grid axis between existing vertices. The grid is made
bistochastic (``n``, ``m``: 10 iterations) and the solver finds the vertex values ``y`` of

    (lam * (diag(m) - diag(n) B diag(n)) + diag(S c)) y = S (c * t)

for a target ``t`` and confidence ``c`` by conjugate gradients (Jacobi preconditioner, 25
iterations, relative tolerance 1e-5, from the flat start ``S (c * t) / S c``); the output is
``S' y``. TokenCut refines its masks with it at sigmas 16 / 16 / 8, ``lam = 256``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg

__all__ = ["bilateral_refine", "bilateral_solve"]

_RGB_TO_YUV = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
])
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])
_BISTOCHASTIC_ITERATIONS = 10
_CG_ITERATIONS = 25
_CG_TOLERANCE = 1e-5
_DIAGONAL_MIN = 1e-5  # floor of the Jacobi preconditioner's diagonal


def _grid(image: np.ndarray, sigmas: tuple[float, float, float]) -> tuple[scipy.sparse.csr_matrix, ...]:
    """Splat (vertices, pixels) and blur (vertices, vertices) matrices of an RGB image (H, W, 3)."""
    sigma_spatial, sigma_luma, sigma_chroma = sigmas
    height, width = image.shape[:2]
    yuv = image.reshape(-1, 3).astype(np.float64) @ _RGB_TO_YUV.T + _YUV_OFFSET
    rows, cols = np.indices((height, width)).reshape(2, -1)
    scaled = np.column_stack([cols / sigma_spatial, rows / sigma_spatial,
                              yuv[:, :1] / sigma_luma, yuv[:, 1:] / sigma_chroma])
    coords = np.floor(scaled).astype(np.int64) + 1  # from 1, so a step of -1 stays on the grid
    extent = coords.max(axis=0) + 2
    vertices, vertex_of_pixel = np.unique(np.ravel_multi_index(tuple(coords.T), extent), return_inverse=True)
    count = len(vertices)
    splat = scipy.sparse.csr_matrix((np.ones(coords.shape[0]), (vertex_of_pixel, np.arange(coords.shape[0]))),
                                    shape=(count, coords.shape[0]))
    blur = 2 * coords.shape[1] * scipy.sparse.identity(count, format="csr")
    for axis in range(coords.shape[1]):
        stride = int(np.prod(extent[axis + 1:]))
        for step in (-stride, stride):
            found = np.minimum(np.searchsorted(vertices, vertices + step), count - 1)
            exists = np.flatnonzero(vertices[found] == vertices + step)
            blur = blur + scipy.sparse.csr_matrix(
                (np.ones(len(exists)), (exists, found[exists])), shape=(count, count))
    return splat, blur


def bilateral_solve(
        image: np.ndarray,
        target: np.ndarray,
        confidence: float | np.ndarray = 0.999,
        sigma_spatial: float = 16.0,
        sigma_luma: float = 16.0,
        sigma_chroma: float = 8.0,
        lam: float = 256.0,
) -> np.ndarray:
    """Edge-aware smoothing of ``target`` (H, W) on the RGB ``image`` (H, W, 3) uint8.

    ``confidence`` is a scalar or (H, W) array of non-negative weights of the target. Returns
    float64 (H, W).
    """
    image, target = np.asarray(image), np.asarray(target, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != target.shape:
        raise ValueError(f"expected an RGB image (H, W, 3) and a target (H, W) of the same size, got "
                         f"{image.shape} and {target.shape}")
    if min(sigma_spatial, sigma_luma, sigma_chroma) <= 0 or lam <= 0:
        raise ValueError("the sigmas and lam must be positive")
    confidence = np.broadcast_to(np.asarray(confidence, dtype=np.float64), target.shape).reshape(-1)
    if not (confidence >= 0).all():
        raise ValueError("confidence must be non-negative")
    splat, blur = _grid(image, (sigma_spatial, sigma_luma, sigma_chroma))
    counts = np.asarray(splat.sum(axis=1)).ravel()
    n = np.ones(len(counts))
    for _ in range(_BISTOCHASTIC_ITERATIONS):
        n = np.sqrt(n * counts / (blur @ n))
    m = n * (blur @ n)
    weights = splat @ confidence
    system = lam * (scipy.sparse.diags(m) - scipy.sparse.diags(n) @ blur @ scipy.sparse.diags(n)) \
        + scipy.sparse.diags(weights)
    rhs = splat @ (confidence * target.reshape(-1))
    start = np.divide(rhs, weights, out=np.zeros_like(rhs), where=weights > 0)
    jacobi = scipy.sparse.diags(1 / np.maximum(system.diagonal(), _DIAGONAL_MIN))
    solution, _ = scipy.sparse.linalg.cg(system, rhs, x0=start, rtol=_CG_TOLERANCE, maxiter=_CG_ITERATIONS,
                                         M=jacobi)
    return (splat.T @ solution).reshape(target.shape)


def _component(labels: np.ndarray, count: int, rule: str) -> np.ndarray:
    """One labelled component of ``labels`` (H, W) as bool, chosen by ``rule``."""
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    if rule == "largest":
        return labels == np.argmax(sizes[1:]) + 1 if count else np.zeros(labels.shape, dtype=bool)
    if count == 0:  # the reference's fallback: the whole image
        return np.ones(labels.shape, dtype=bool)
    # the reference ranks every label by size, the background's 0 included, and takes the second
    return labels == np.argsort(sizes, kind="stable")[-2]


def bilateral_refine(
        image: np.ndarray,
        mask: np.ndarray,
        sigma_spatial: float = 16.0,
        sigma_luma: float = 16.0,
        sigma_chroma: float = 8.0,
        lam: float = 256.0,
        min_iou: float = 0.5,
        component: Literal["reference", "largest"] = "reference",
) -> np.ndarray | None:
    """TokenCut's refinement of a coarse bool ``mask`` (H, W) on its RGB ``image`` (H, W, 3) uint8.

    The mask is smoothed by :func:`bilateral_solve` (confidence 0.999), thresholded at 0.5, its
    holes filled, and one 4-connected component kept: with ``component='reference'`` the label
    second by pixel count, background counted (the largest object while the background is the
    largest region, else the background; the whole image if nothing is left), as TokenCut's
    code does; ``'largest'`` keeps the largest object. Returns the refined (H, W) bool mask, or
    ``None`` where its IoU with ``mask`` is under ``min_iou`` (the reference discards those).
    """
    if component not in ("reference", "largest"):
        raise ValueError(f"component must be 'reference' or 'largest', got {component!r}")
    mask = np.asarray(mask, dtype=bool)
    smooth = bilateral_solve(image, mask, 0.999, sigma_spatial, sigma_luma, sigma_chroma, lam)
    labels, count = scipy.ndimage.label(scipy.ndimage.binary_fill_holes(smooth > 0.5))
    refined = _component(labels, count, component)
    union = np.count_nonzero(refined | mask)
    if union and np.count_nonzero(refined & mask) < min_iou * union:
        return None
    return refined
