"""The RobustViT objective (Chefer, Schwartz, Wolf, 2022, Eq. 1-5) and input-gradient baselines.

``RelevanceRegularizer`` is called after the user's own forward::

    logits = model(images)
    out = criterion(logits, masks, labels=labels)
    out.loss.backward()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .gae import GAEHandle, normalize_relevance, upsample_relevance
from .gae.rollout import resolve_target

__all__ = ["RegularizerOutput", "RelevanceRegularizer", "InputGradientRegularizer", "prepare_masks"]

Classification = Literal["confidence", "ground_truth", "off"]
RelevanceTarget = Literal["label", "prediction"]


@dataclass
class RegularizerOutput:
    """The total loss and its unweighted parts; a part that was switched off is None."""

    loss: torch.Tensor
    background: torch.Tensor | None = None
    foreground: torch.Tensor | None = None
    classification: torch.Tensor | None = None
    relevance: torch.Tensor | None = None  # (B, H, W) in [0, 1], at the mask size
    mask_penalty: torch.Tensor | None = None  # input-gradient baselines


def prepare_masks(masks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Validate foreground masks and return them as float (B, H, W) in [0, 1].

    Accepts (B, H, W) or (B, 1, H, W); bool, uint8 in {0, 1}, or float in [0, 1].
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
    if masks.shape[0] != batch_size:
        raise ValueError(f"masks hold {masks.shape[0]} images but the logits hold {batch_size}")
    if masks.numel() == 0:
        raise ValueError(f"masks are empty: shape {tuple(masks.shape)}")
    if masks.dtype == torch.bool:
        return masks.float()
    if masks.dtype == torch.uint8:
        if masks.max() > 1:
            raise ValueError(
                f"uint8 masks must hold 0 and 1, got values up to {int(masks.max())} "
                "(for 0/255 masks pass masks // 255 or masks.bool())")
        return masks.float()
    if not masks.is_floating_point():
        raise TypeError(f"masks must be bool, uint8 or floating point, got {masks.dtype}")
    if torch.isnan(masks).any():
        raise ValueError("masks contain NaN")
    low, high = float(masks.min()), float(masks.max())
    if low < 0 or high > 1:
        raise ValueError(f"float masks must lie in [0, 1], got values in [{low:g}, {high:g}]")
    return masks.float()


def _classification_loss(
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        mode: Classification,
        temperature: float,
) -> torch.Tensor:
    if mode == "confidence":  # confidence boosting: CE with the model's own prediction
        target = logits.detach().argmax(dim=1)
    elif labels is None:
        raise ValueError("classification='ground_truth' needs labels: call criterion(logits, masks, labels=...)")
    else:
        target = labels
    return F.cross_entropy(logits / temperature, target)


def _check_logits(logits: torch.Tensor) -> None:
    """Refuse anything but one (B, classes) tensor of logits.

    Non-finite logits pass: the loss is then NaN or inf, which the training loop stops on in
    every process at once (an error raised here in one process would leave the others waiting).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"expected the logits as one tensor, got a {type(logits).__name__}: a distilled DeiT "
            "with distilled training on returns (class, distillation) logits; pass their mean "
            "(a + b) / 2, as timm does at inference, or call model.set_distilled_training(False)")
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, classes), got {tuple(logits.shape)}")


def _check_aspect(mask_size: tuple[int, int], grid: tuple[int, int]) -> None:
    """Refuse masks whose aspect ratio differs from the images' (by more than one patch)."""
    (height, width), (gh, gw) = mask_size, grid
    if round(height * gw / width) != gh or round(width * gh / height) != gw:
        raise ValueError(
            f"masks of {height}x{width} (height x width) do not have the images' aspect ratio (patch grid "
            f"{gh}x{gw}): the relevance map would be stretched onto them; resize and crop the masks as the "
            "images (e.g. relevance_finetune.data.paired_transforms)")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class RelevanceRegularizer(nn.Module):
    """The paper's loss: ``lambda_relevance * (lambda_bg * L_bg + lambda_fg * L_fg) + lambda_classification * L_cls``.

    Parameters
    ----------
    gae:
        The handle returned by ``attach_gae(model)``.
    lambda_bg, lambda_fg, lambda_relevance, lambda_classification:
        Weights of Eq. 3 and 5 (paper defaults). A weight of 0 skips that term's computation.
    classification:
        ``"confidence"`` (CE with the detached argmax, Eq. 4), ``"ground_truth"`` (CE with the
        labels) or ``"off"``.
    temperature:
        Divides the logits of the classification term (after the argmax is taken).
    relevance_target:
        ``"label"``: relevance for the labels when given, else the prediction (the reference
        code); ``"prediction"``: always the predicted class.
    eps:
        Guards the min-max range (relative to the map's largest magnitude) so that a constant
        map normalises to 0, never NaN.

    The relevance map is upsampled bilinearly to the mask size and min-max normalised per image;
    both MSE terms average over all B x H x W elements; L_fg's target is the mask itself.
    """

    def __init__(
            self,
            gae: GAEHandle,
            lambda_bg: float = 2.0,
            lambda_fg: float = 0.3,
            lambda_relevance: float = 0.8,
            lambda_classification: float = 0.2,
            classification: Classification = "confidence",
            temperature: float = 1.0,
            relevance_target: RelevanceTarget = "label",
            eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if not isinstance(gae, GAEHandle):
            raise TypeError(f"RelevanceRegularizer needs the handle from attach_gae(model), got {type(gae).__name__}")
        _check_choice("classification", classification, ("confidence", "ground_truth", "off"))
        _check_choice("relevance_target", relevance_target, ("label", "prediction"))
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.gae = gae
        self.lambda_bg = lambda_bg
        self.lambda_fg = lambda_fg
        self.lambda_relevance = lambda_relevance
        self.lambda_classification = lambda_classification
        self.classification = classification
        self.temperature = temperature
        self.relevance_target = relevance_target
        self.eps = eps

    def forward(
            self,
            logits: torch.Tensor,
            masks: torch.Tensor,
            labels: torch.Tensor | None = None,
    ) -> RegularizerOutput:
        _check_logits(logits)
        masks = prepare_masks(masks, logits.shape[0]).to(logits.device)
        if labels is not None:
            labels = resolve_target(logits, labels)
        out = RegularizerOutput(loss=logits.new_zeros(()))
        use_bg = self.lambda_relevance != 0 and self.lambda_bg != 0
        use_fg = self.lambda_relevance != 0 and self.lambda_fg != 0
        if use_bg or use_fg:
            target = labels if self.relevance_target == "label" else None
            raw = self.gae.relevance(logits, target)
            _check_aspect(masks.shape[-2:], raw.shape[-2:])
            relevance = normalize_relevance(upsample_relevance(raw, masks.shape[-2:]), self.eps)
            out.relevance = relevance
            relevance_loss = logits.new_zeros(())
            if use_bg:
                out.background = (relevance * (1 - masks)).square().mean()
                relevance_loss = relevance_loss + self.lambda_bg * out.background
            if use_fg:
                out.foreground = (relevance * masks - masks).square().mean()
                relevance_loss = relevance_loss + self.lambda_fg * out.foreground
            out.loss = out.loss + self.lambda_relevance * relevance_loss
        if self.classification != "off" and self.lambda_classification != 0:
            out.classification = _classification_loss(logits, labels, self.classification, self.temperature)
            out.loss = out.loss + self.lambda_classification * out.classification
        return out

    def extra_repr(self) -> str:
        return (f"lambda_bg={self.lambda_bg}, lambda_fg={self.lambda_fg}, "
                f"lambda_relevance={self.lambda_relevance}, "
                f"lambda_classification={self.lambda_classification}, "
                f"classification={self.classification!r}, temperature={self.temperature}, "
                f"relevance_target={self.relevance_target!r}")


class InputGradientRegularizer(nn.Module):
    """GradMask and RRR (the paper's baselines, Appendix D), with the penalty really trained.

    ``method="gradmask"``: relevance = d logit[label] / d input; penalty = MSE(relevance * (1 - S), 0).
    ``method="rrr"``: relevance = d (sum of log-softmax) / d input; penalty = sum((relevance * (1 - S))^2).
    Loss = ``lambda_mask * penalty + lambda_classification * CE(logits, labels)``.

    The input gradient is taken with ``create_graph=True``, so the penalty reaches the weights
    (the reference code omitted it). The images must require grad before the forward, and
    attention must run on the explicit path (``attach_gae`` or ``explicit_attention``): SDPA
    has no double backward.
    """

    def __init__(
            self,
            method: Literal["gradmask", "rrr"] = "gradmask",
            lambda_mask: float = 1.0,
            lambda_classification: float = 1.0,
    ) -> None:
        super().__init__()
        _check_choice("method", method, ("gradmask", "rrr"))
        self.method = method
        self.lambda_mask = lambda_mask
        self.lambda_classification = lambda_classification

    def forward(
            self,
            logits: torch.Tensor,
            images: torch.Tensor,
            masks: torch.Tensor,
            labels: torch.Tensor,
    ) -> RegularizerOutput:
        if not images.requires_grad:
            raise ValueError(
                f"{self.method} needs the input gradient: call images.requires_grad_(True) "
                "before the forward that produced these logits")
        masks = prepare_masks(masks, logits.shape[0]).to(images.device)
        if masks.shape[-2:] != images.shape[-2:]:
            masks = F.interpolate(masks[:, None], size=images.shape[-2:], mode="nearest")[:, 0]
        background = (1 - masks)[:, None]
        out = RegularizerOutput(loss=logits.new_zeros(()))
        if self.lambda_mask != 0:
            if self.method == "gradmask":
                score = logits.gather(1, labels[:, None]).sum()
            else:
                score = F.log_softmax(logits, dim=1).sum()
            (grad,) = torch.autograd.grad(score, images, create_graph=True)
            penalised = grad * background
            penalty = penalised.square().mean() if self.method == "gradmask" else penalised.square().sum()
            out.mask_penalty = penalty
            out.loss = out.loss + self.lambda_mask * penalty
        if self.lambda_classification != 0:
            out.classification = F.cross_entropy(logits, labels)
            out.loss = out.loss + self.lambda_classification * out.classification
        return out

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, lambda_mask={self.lambda_mask}, "
                f"lambda_classification={self.lambda_classification}")
