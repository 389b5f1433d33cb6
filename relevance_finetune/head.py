"""Last-layer retraining: refit a model's linear head on counterfactual views of masked images, or on groups.

Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, ICLR 2023) keeps the backbone and refits
the last layer on data where the shortcut no longer goes with the class. Here that data comes from
the masks: every masked image and ``views`` copies of it with its object pasted onto other images'
backgrounds (``paste_objects``, as ``BackgroundSwap`` pastes them), labels unchanged. The procedure,
as in their code:

1. the refit set: the masked images and their counterfactual views;
2. pre-logit features (``model.forward_head(model.forward_features(x), pre_logits=True)``);
3. standardised features (the refit set's mean and std);
4. the L1 strength ``C`` chosen by worst-class accuracy on held-out counterfactual views;
5. ``fits`` fits on class-balanced subsamples with that ``C``, coefficients averaged;
6. the standardisation folded into the model's own ``nn.Linear`` head, so the model stays an
   ordinary timm model for export, explanation and evaluation.

``refit_head_groups`` is Deep Feature Reweighting's own protocol, for data with group labels
(Waterbirds' bird x background) instead of masks: the features of held-out images (a validation
split), ``C`` chosen by the worst-group accuracy on a held-out half of each group after a fit on a
group-balanced subsample of the other half, then ``fits`` fits on group-balanced subsamples of
every image, averaged and folded into the head as above. Both share the solver, the
standardisation, the subsamples and the fold, so a user with masks and groups compares them on one split.

The solver is L1-regularised multinomial logistic regression with scikit-learn's objective
(``C * sum(cross-entropy) + |W|_1``, intercept unpenalised), solved in torch by FISTA with
backtracking and restarts on the full batch: no dependency beyond torch, on the model's device.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import paste_objects, usable_masks

__all__ = ["DFR_C", "HeadRefit", "fit_l1_logistic", "l1_logistic_objective", "linear_classifier", "pre_logits",
           "refit_head", "refit_head_groups"]

# Deep Feature Reweighting's grid of inverse L1 strengths
DFR_C: tuple[float, ...] = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


@dataclass(frozen=True)
class HeadRefit:
    """What ``refit_head`` did.

    Attributes
    ----------
    C:
        The chosen inverse L1 strength.
    scores:
        Per candidate ``C``: (worst-class accuracy, mean accuracy) on the held-out counterfactual
        views (``refit_head``), or (worst-group accuracy, mean accuracy) on the held-out images
        (``refit_head_groups``), as fractions; empty when only one ``C`` was given.
    features:
        The width of the pre-logit features (the head's ``in_features``).
    rows:
        Images in the refit set (masked images and their views, or the group-labelled images).
    seconds:
        Wall time of the whole refit.
    """

    C: float
    scores: Mapping[float, tuple[float, float]]
    features: int
    rows: int
    seconds: float


class RefitSet(NamedTuple):
    """Pre-logit features (n, D), labels (n,), and which rows are counterfactual views (n,)."""

    features: torch.Tensor
    labels: torch.Tensor
    view: torch.Tensor


def refit_head(
        model: nn.Module,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        *,
        views: int = 4,
        C: Sequence[float] = DFR_C,
        fits: int = 20,
        held_out: float = 0.5,
        validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        validation_groups: torch.Tensor | None = None,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
) -> HeadRefit:
    """Refit ``model``'s linear head in place on counterfactual views of masked images.

    Parameters
    ----------
    model:
        A timm model with one ``nn.Linear`` classifier (``model.get_classifier()``).
    images, masks, labels:
        (N, C, H, W) images as the model takes them, (N, [1,] H, W) masks in [0, 1] (1 = object),
        (N,) class indices; every class of the head needs an image whose mask has both object
        and background.
    views:
        Counterfactual views per masked image (its object on other images' backgrounds).
    C:
        Candidate inverse L1 strengths (scikit-learn's ``C``); one value skips the choice.
    fits:
        Fits on class-balanced subsamples whose coefficients are averaged.
    held_out:
        Share of each class's images whose views score the candidates (split by image).
    validation:
        Optional masked (images, masks, labels): the candidates are scored on their views
        instead, and the fits use every image.
    validation_groups:
        Optional (N_val,) group of each ``validation`` image: the candidates are scored by the
        worst-group accuracy on the validation images themselves, not on their views.
    batch_size, seed, progress:
        Images per forward (the views do not depend on it); the seed of the views, split and
        subsamples; a tqdm bar.
    """
    start = time.perf_counter()
    classifier = linear_classifier(model)
    num_classes, candidates = classifier.out_features, tuple(float(c) for c in C)
    _check_settings(candidates, fits, held_out, views)
    if validation_groups is not None and (validation is None or validation_groups.shape != validation[2].shape):
        raise ValueError("validation_groups must give the group of each validation image: (N_val,) with validation="
                         "(images, masks, labels)")
    movable = _movable(images, masks, labels, num_classes)
    generator = torch.Generator().manual_seed(seed)
    features = partial(_refit_set, model, views=views, generator=generator, batch_size=batch_size, progress=progress)
    choose = len(candidates) > 1
    val_movable = _movable(*validation, num_classes) if choose and validation is not None else None
    everything = torch.arange(len(labels))
    with _eval_mode(model):
        if choose and validation is None:  # DFR: fit on one half of the images, score on the other's views
            fit_images, held_images = _split_by_image(labels, movable, held_out, generator)
            fit_part = features(images, masks, labels, fit_images, movable)
            scored = features(images, masks, labels, held_images, movable)
            refit = RefitSet(*(torch.cat(pair) for pair in zip(fit_part, scored)))
        else:
            refit = fit_part = features(images, masks, labels, everything, movable)
            if val_movable is not None:
                scored = features(*validation, torch.arange(len(validation[2])), val_movable)
    _check_width(classifier, refit.features)
    mean, std = _standardisation(refit.features)
    chosen, scores = candidates[0], {}
    if choose:
        fit_part, scored = _standardised(fit_part, mean, std), _standardised(scored, mean, std)
        fit_part = _rows(fit_part, _balanced_subsample(fit_part.labels, generator))
        if validation_groups is None:  # worst class of the views
            scored, strata = _rows(scored, scored.view), scored.labels[scored.view]
        else:  # worst group of the validation images, in their order
            scored, strata = _rows(scored, ~scored.view), validation_groups.to(scored.labels.device)
        chosen, scores = _choose_c(fit_part, scored, strata, candidates, num_classes)
    refit = _standardised(refit, mean, std)
    coef, intercept = _averaged_fits(refit, refit.labels, chosen, fits, num_classes, generator)
    _fold_into_head(classifier, coef, intercept, mean, std)
    return HeadRefit(chosen, MappingProxyType(scores), refit.features.shape[1], len(refit.labels),
                     time.perf_counter() - start)


def refit_head_groups(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        *,
        num_groups: int | None = None,
        C: Sequence[float] = DFR_C,
        fits: int = 20,
        held_out: float = 0.5,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
) -> HeadRefit:
    """Refit ``model``'s linear head in place on group-labelled held-out images (DFR's own protocol).

    Parameters
    ----------
    model:
        A timm model with one ``nn.Linear`` classifier (``model.get_classifier()``).
    images, labels, groups:
        (N, C, H, W) images as the model takes them (held-out data, e.g. a validation split),
        (N,) class indices and (N,) group indices (Waterbirds: ``2 * y + place``); every class of
        the head and every group needs an image.
    num_groups:
        Groups G: ``groups`` lie in [0, G) (default: ``groups.max() + 1``).
    C:
        Candidate inverse L1 strengths (scikit-learn's ``C``); one value skips the choice.
    fits:
        Fits on group-balanced subsamples of every image (as many per group as the smallest
        group has), whose coefficients are averaged.
    held_out:
        Share of each group's images that scores the candidates (by worst-group accuracy); each
        candidate fits a group-balanced subsample of the rest.
    batch_size, seed, progress:
        Feature batches; the seed of the split and subsamples; a tqdm bar.
    """
    start = time.perf_counter()
    classifier = linear_classifier(model)
    num_classes, candidates = classifier.out_features, tuple(float(c) for c in C)
    _check_settings(candidates, fits, held_out)
    groups = _check_groups(images, labels, groups, num_classes, num_groups)
    generator = torch.Generator().manual_seed(seed)
    choose = len(candidates) > 1
    fit_images, held_images = _split_by_group(groups, held_out, generator) if choose else (None, None)
    with _eval_mode(model):
        features = _pre_logits_of(model, images.split(batch_size), progress)
    _check_width(classifier, features)
    mean, std = _standardisation(features)
    no_views = torch.zeros(len(labels), dtype=torch.bool, device=features.device)
    refit = _standardised(RefitSet(features, labels.to(features.device), no_views), mean, std)
    chosen, scores = candidates[0], {}
    if choose:
        fit_part = _rows(refit, fit_images[_balanced_subsample(groups[fit_images], generator)])
        chosen, scores = _choose_c(fit_part, _rows(refit, held_images), groups[held_images].to(features.device),
                                   candidates, num_classes)
    coef, intercept = _averaged_fits(refit, groups, chosen, fits, num_classes, generator)
    _fold_into_head(classifier, coef, intercept, mean, std)
    return HeadRefit(chosen, MappingProxyType(scores), features.shape[1], len(labels), time.perf_counter() - start)


def linear_classifier(model: nn.Module) -> nn.Linear:
    """``model``'s one linear classifier (timm's ``get_classifier()``), or an error saying what is needed."""
    name = type(model).__name__
    if not all(hasattr(model, attr) for attr in ("forward_features", "forward_head", "get_classifier")):
        raise TypeError(f"refit_head needs a timm model (forward_features, forward_head(pre_logits=True), "
                        f"get_classifier); got {name}")
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)):
        raise ValueError(f"{name} has {len(classifier)} heads (e.g. DeiT's head and head_dist, each on its own "
                         "token): refit_head refits one linear head on the pre-logits it reads")
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"refit_head needs a linear classifier (nn.Linear from get_classifier()); {name} has "
                         f"{type(classifier).__name__}: create the model with num_classes > 0 and timm's own head")
    if classifier.bias is None:
        raise ValueError(f"refit_head needs a head with a bias (the intercept and the standardisation live there); "
                         f"{name}'s has none")
    return classifier


def _check_settings(candidates: tuple[float, ...], fits: int, held_out: float, views: int = 1) -> None:
    if views < 1 or fits < 1:
        raise ValueError(f"views and fits must be at least 1, got views={views}, fits={fits}")
    if not candidates or any(not c > 0 or math.isinf(c) for c in candidates):
        raise ValueError(f"C must hold positive finite values, got {candidates}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must lie strictly between 0 and 1, got {held_out}")


def _check_width(classifier: nn.Linear, features: torch.Tensor) -> None:
    if classifier.in_features != features.shape[1]:
        raise ValueError(f"the head reads {classifier.in_features} features but forward_head(pre_logits=True) "
                         f"gives {features.shape[1]}: the head refit needs the head to read the pre-logits")


def _check_groups(images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_classes: int,
                  num_groups: int | None) -> torch.Tensor:
    """``groups`` on the CPU, or an error for bad shapes, labels or groups outside their range, and
    a class or group without an image (named)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    for name, values in (("labels", labels), ("groups", groups)):
        if values.shape != images.shape[:1] or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ValueError(f"{name} must be (N,) integer indices for {images.shape[0]} images; got {values.dtype} "
                             f"{tuple(values.shape)}")
    labels, groups = labels.cpu(), groups.cpu()
    count = int(groups.max()) + 1 if num_groups is None and len(groups) else num_groups or 0
    for name, values, size in (("labels", labels, num_classes), ("groups", groups, count)):
        if len(values) and (values.min() < 0 or values.max() >= size):
            raise ValueError(f"{name} must lie in [0, {size}); got {values.min().item()}..{values.max().item()}")
        missing = sorted(set(range(size)) - set(values.tolist()))
        if missing or not len(values):
            what = "class(es)" if name == "labels" else "group(s)"
            raise ValueError(f"no image of {what} {missing}: the group refit needs every class the head predicts "
                             f"({num_classes}) and every group ({count})")
    return groups


def _split_by_group(groups: torch.Tensor, held_out: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) image indices: ``held_out`` of each group's images are held out."""
    held = []
    for group in groups.unique().tolist():
        members = torch.nonzero(groups == group).squeeze(1)
        if len(members) < 2:
            raise ValueError(f"group {group} has one image: choosing C on a held-out half needs two per group "
                             "(or pass one value of C)")
        count = min(max(round(held_out * len(members)), 1), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held = torch.cat(held).sort().values
    kept = torch.ones(len(groups), dtype=torch.bool)
    kept[held] = False
    return torch.nonzero(kept).squeeze(1), held


def _movable(images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) bool: which images' masks have both object and background (those get views); errors
    for bad shapes, labels outside the head, and classes without such an image."""
    masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"images must be (N, C, H, W) and masks (N, [1,] H, W) at their size; got images "
                         f"{tuple(images.shape)}, masks {tuple(masks.shape)}")
    if labels.shape != images.shape[:1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be (N,) class indices for {images.shape[0]} images; got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    labels = labels.cpu()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the head's classes); got "
                         f"{labels.min().item()}..{labels.max().item()}")
    movable = usable_masks(masks).cpu()
    if not movable.any():
        raise ValueError("every mask is empty or full: the refit needs objects with background around them")
    missing = sorted(set(range(num_classes)) - set(labels[movable].tolist()))
    if missing:
        raise ValueError(f"no masked image of class(es) {missing} (a mask with both object and background): "
                         "the refit needs every class the head predicts")
    return movable


def _split_by_image(labels: torch.Tensor, movable: torch.Tensor, held_out: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) image indices: ``held_out`` of each class's movable images are held out (the
    rest, and every image without a usable mask, fit), so no image, view or background is in both."""
    labels = labels.cpu()
    held = []
    for label in labels[movable].unique().tolist():
        members = torch.nonzero(movable & (labels == label)).squeeze(1)
        if len(members) < 2:
            raise ValueError(f"class {label} has one masked image: choosing C on held-out images needs two per "
                             "class (or pass validation=..., or one value of C)")
        count = min(max(round(held_out * len(members)), 1), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held = torch.cat(held).sort().values
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held] = False
    return torch.nonzero(kept).squeeze(1), held


@torch.no_grad()
def _refit_set(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
               part: torch.Tensor, movable: torch.Tensor, *, views: int, generator: torch.Generator,
               batch_size: int, progress: bool) -> RefitSet:
    """Features of the images ``part`` and of ``views`` counterfactual views of each movable one
    (its object on the background of another movable image of ``part``)."""
    batches = list(_image_batches(images, masks, part, part[movable[part]], views, generator, batch_size))
    features = _pre_logits_of(model, [batch for batch, _, _ in batches], progress)
    sources = torch.cat([index for _, index, _ in batches])
    view = torch.cat([torch.full((len(index),), is_view) for _, index, is_view in batches])
    return RefitSet(features, labels.cpu()[sources].to(features.device), view.to(features.device))


def _image_batches(images: torch.Tensor, masks: torch.Tensor, part: torch.Tensor, movable: torch.Tensor,
                   views: int, generator: torch.Generator,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(images, their indices, whether they are views): the images ``part``, then ``views`` rounds
    of each ``movable`` one's object on another's background. Each round's donors are a random
    cycle over all of ``movable`` (nobody gets their own background), drawn before the batching,
    so the views do not depend on ``batch_size``."""
    for index in part.split(batch_size):
        yield images[index], index, False
    if len(movable) < 2:
        raise ValueError(f"{len(movable)} image(s) with a usable mask: a counterfactual view needs another "
                         "image's background")
    for _ in range(views):
        order = movable[torch.randperm(len(movable), generator=generator)]
        for index, donors in zip(order.split(batch_size), order.roll(-1).split(batch_size)):
            yield paste_objects(images[index], masks[index], images[donors], masks[donors]), index, True


@torch.no_grad()
def _pre_logits_of(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool) -> torch.Tensor:
    """The pre-logits of every batch, concatenated, on the model's device."""
    device = next(model.parameters()).device
    features = []
    with tqdm(total=sum(len(batch) for batch in batches), desc="head refit: features", unit="img",
              disable=not progress) as bar:
        for batch in batches:
            features.append(pre_logits(model, batch.to(device)))
            bar.update(len(batch))
    return torch.cat(features)


def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the head reads: ``forward_head(forward_features(images), pre_logits=True)``, (B, D)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


class _eval_mode:
    """``model.eval()`` inside the block, its mode restored after."""

    def __init__(self, model: nn.Module):
        self.model, self.training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.training)


def _solver_dtype(device: torch.device) -> torch.dtype:
    """float64 for the fits where the device has it (Apple's MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature (std 1 where a feature is constant, as scikit-learn's StandardScaler)."""
    features = features.to(_solver_dtype(features.device))
    mean, std = features.mean(0), features.std(0, unbiased=False)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _standardised(part: RefitSet, mean: torch.Tensor, std: torch.Tensor) -> RefitSet:
    return part._replace(features=(part.features.to(mean.dtype) - mean) / std)


def _rows(part: RefitSet, rows: torch.Tensor) -> RefitSet:
    """The rows ``rows`` (indices or a bool mask) of ``part``."""
    return RefitSet(*(values[rows.to(values.device)] for values in part))


def _choose_c(fit: RefitSet, scored: RefitSet, scored_by: torch.Tensor, candidates: tuple[float, ...],
              num_classes: int) -> tuple[float, dict[float, tuple[float, float]]]:
    """The ``C`` whose fit on ``fit`` has the best worst accuracy over the strata ``scored_by`` (the
    classes or the groups) of ``scored`` (ties: the mean accuracy, then the order of ``candidates``)."""
    scores, start = {}, None
    for c in sorted(candidates):  # the sparsest first, each fit warm-starting the next C's
        coef, intercept = start = fit_l1_logistic(fit.features, fit.labels, c, num_classes, init=start)
        scores[c] = _worst_and_mean_accuracy(scored.features @ coef.T + intercept, scored.labels, scored_by)
    best = max(candidates, key=lambda c: scores[c])  # max keeps the first of equals
    return best, scores


def _worst_and_mean_accuracy(logits: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor) -> tuple[float, float]:
    """(worst accuracy over the strata present, mean accuracy)."""
    correct = (logits.argmax(1) == labels).double()
    per_stratum = [correct[strata == value].mean().item() for value in strata.unique().tolist()]
    return min(per_stratum), correct.mean().item()


def _balanced_subsample(strata: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Row indices: as many random rows of every stratum present (class or group) as the rarest has."""
    strata = strata.cpu()
    members = [torch.nonzero(strata == value).squeeze(1) for value in strata.unique().tolist()]
    size = min(len(rows) for rows in members)
    picked = [rows[torch.randperm(len(rows), generator=generator)[:size]] for rows in members]
    return torch.cat(picked).sort().values


def _averaged_fits(refit: RefitSet, strata: torch.Tensor, C: float, fits: int, num_classes: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean coefficients and intercepts of ``fits`` fits on subsamples of ``refit`` balanced over
    ``strata`` (its classes, or its groups)."""
    coefs, intercepts = [], []
    for _ in range(fits):
        rows = _balanced_subsample(strata, generator)
        start = (coefs[0], intercepts[0]) if coefs else None  # the first fit warm-starts the others
        coef, intercept = fit_l1_logistic(refit.features[rows], refit.labels[rows], C, num_classes, init=start)
        coefs.append(coef)
        intercepts.append(intercept)
    return torch.stack(coefs).mean(0), torch.stack(intercepts).mean(0)


@torch.no_grad()
def _fold_into_head(classifier: nn.Linear, coef: torch.Tensor, intercept: torch.Tensor, mean: torch.Tensor,
                    std: torch.Tensor) -> None:
    """Write ``coef @ ((x - mean) / std) + intercept`` as the head's own ``W x + b``."""
    weight = coef / std
    classifier.weight.copy_(weight.to(classifier.weight))
    classifier.bias.copy_((intercept - weight @ mean).to(classifier.bias))


def l1_logistic_objective(features: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor,
                          intercept: torch.Tensor, C: float) -> float:
    """scikit-learn's L1 multinomial objective: ``C * sum_i CE(coef x_i + intercept, y_i) + |coef|_1``."""
    logits = features @ coef.T + intercept
    return (C * F.cross_entropy(logits, labels, reduction="sum") + coef.abs().sum()).item()


def fit_l1_logistic(features: torch.Tensor, labels: torch.Tensor, C: float, num_classes: int | None = None, *,
                    tol: float = 1e-4, max_iter: int = 10_000,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L1-regularised multinomial logistic regression, scikit-learn's objective (``l1_logistic_objective``).

    FISTA (Beck & Teboulle 2009) with backtracking on the full batch, restarted whenever the
    objective rises (O'Donoghue & Candès 2015); the intercept is not penalised. Stops when the
    objective and the coefficients change by at most ``tol``, relatively, in one step.

    Parameters
    ----------
    features:
        (n, D) float features (standardised works best).
    labels:
        (n,) class indices.
    C:
        Inverse L1 strength.
    num_classes:
        Classes K (default: ``labels.max() + 1``).
    tol:
        Relative change that stops it (scikit-learn's default, 1e-4).
    init:
        Coefficients and intercepts to start from (a warm start; default zeros).

    Returns
    -------
    (K, D) coefficients and (K,) intercepts, in ``features``' dtype and device.
    """
    n, width = features.shape
    classes = num_classes or int(labels.max()) + 1
    penalty = 1.0 / (C * n)  # the objective divided by C n: mean CE + penalty |W|_1
    onehot = F.one_hot(labels, classes).to(features.dtype)

    def smooth(coef: torch.Tensor, intercept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = (features @ coef.T + intercept).log_softmax(1)
        return -(log_p * onehot).sum() / n, log_p

    coef, intercept = (features.new_zeros(classes, width), features.new_zeros(classes)) if init is None else init
    coef_y, intercept_y = coef, intercept
    value = (smooth(coef, intercept)[0] + penalty * coef.abs().sum()).item()
    t, step, restarted = 1.0, 1.0, True
    for _ in range(max_iter):
        f_y, log_p = smooth(coef_y, intercept_y)
        residual = (log_p.exp() - onehot) / n
        grad_coef, grad_intercept = residual.T @ features, residual.sum(0)
        while True:  # backtracking: halve the step until the quadratic model bounds the loss
            new_coef = _soft_threshold(coef_y - step * grad_coef, step * penalty)
            new_intercept = intercept_y - step * grad_intercept
            d_coef, d_intercept = new_coef - coef_y, new_intercept - intercept_y
            f_new = smooth(new_coef, new_intercept)[0]
            bound = f_y + (grad_coef * d_coef).sum() + (grad_intercept * d_intercept).sum() \
                + ((d_coef ** 2).sum() + (d_intercept ** 2).sum()) / (2 * step)
            if f_new <= bound:
                break
            step /= 2
        new_value = (f_new + penalty * new_coef.abs().sum()).item()
        if new_value > value:
            if restarted:  # a plain proximal step from the last iterate cannot descend: float precision
                return coef, intercept
            t, coef_y, intercept_y, restarted = 1.0, coef, intercept, True
            continue
        change = (new_coef - coef).abs().max().item()
        converged = value - new_value <= tol * abs(new_value) and change <= tol * max(new_coef.abs().max().item(), 1.0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum = (t - 1) / t_next
        coef_y = new_coef + momentum * (new_coef - coef)
        intercept_y = new_intercept + momentum * (new_intercept - intercept)
        coef, intercept, value, t, restarted = new_coef, new_intercept, new_value, t_next, False
        if converged:
            return coef, intercept
    warnings.warn(f"fit_l1_logistic: no convergence in {max_iter} iterations (C={C}); the last iterate is used",
                  stacklevel=2)
    return coef, intercept


def _soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal map of ``threshold * |.|_1``."""
    return values.sign() * (values.abs() - threshold).clamp(min=0)
