"""What defines a benchmark run: the data, the original model, the finetune and the evaluation."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .methods import DEFAULT_METHODS, METHODS
from .synthetic import FAMILIES, SpuriousConfig

__all__ = ["ALL_CLASSES", "FAMILY_SETTINGS", "FINETUNE_CLASSES", "FINETUNE_MASKS", "MASK_SOURCES", "BenchConfig",
           "config_dict"]


# Each family's schedule of the original where it differs from the defaults: measured so that the
# original learns both the objects and the shortcut (docs/benchmark.md), fixed before any method ran.
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {"texture": dict(biased_epochs=8)}
# Which classes get masked finetuning images: half of them (the paper's set A, validated on the
# other half, set B), or all of them (a user who has masks for every class, validated on held-out
# images of every class).
FINETUNE_CLASSES = ("half", "all")
# The masks the finetune and its validation see: the generator's exact ones, every patch the object
# touches (a patch-level mask, as TokenCut gives), which carries background pixels along the outline,
# noisy ones (patch-level, grown or shrunk by 2 patches, a fifth of them another image's: see noisy_masks),
# TokenCut's, made without annotation from a model's keys (automatic_masks.py), or propagated from a few
# annotated ones by a patch classifier on a model's tokens (propagated_masks.py).
FINETUNE_MASKS = ("exact", "patch", "noisy", "tokencut", "propagate")
# The ViT whose last-block keys TokenCut cuts, or whose patch tokens propagation reads: the original itself,
# or its first phase (trained on images whose background is independent of the class, before the shortcut;
# the stand-in for DINO).
MASK_SOURCES = ("original", "first_phase")
# "all" with the same 80 masked finetuning and 200 validation images as "half", spread over every class
ALL_CLASSES: dict[str, Any] = dict(finetune_classes="all", finetune_per_class=8, val_per_class=20)


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run; written into ``results.json``."""

    # data
    family: str = "hue"  # the kind of shortcut: one of synthetic.FAMILIES
    num_classes: int = 10
    image_size: int = 48
    p: float = 0.9
    contrast: tuple[float, float] = (0.05, 0.6)
    # the original model
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    pretrain_images: int = 4000
    pretrain_epochs: int = 8
    biased_images: int = 4000
    biased_epochs: int = 3
    train_batch: int = 32
    original_attempts: int = 3  # restarts of a first phase that never found the objects
    # finetuning (the paper's recipe, scaled down)
    finetune_classes: str = "half"  # "half": set A = the first half, validation on set B (the paper's); "all"
    finetune_per_class: int = 16  # masked images per set-A class
    val_per_class: int = 40  # masked validation images per validation class (set B; "all": every class)
    finetune_epochs: int = 30
    finetune_batch: int = 8
    lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4)
    max_val_drop: float = 2.5  # both rules: val accuracy may fall by at most this much
    select_every: int = 5  # the reliance rule scores a checkpoint every this many epochs
    finetune_distribution: str = "biased"
    finetune_masks: str = "exact"  # one of FINETUNE_MASKS
    mask_source: str = "original"  # "tokencut" and "propagate": the model whose keys or tokens are read, one of MASK_SOURCES
    annotated_per_class: int = 8  # "propagate": the first this many finetuning images of each class keep exact masks
    finetune_steps: int = 0  # 0: an epoch is a pass over the finetuning images; N: N optimiser steps in all
    baseline_lambda: float = 1.0  # input-gradient penalty, relative to its initial CE ratio
    # evaluation
    test_images: int = 500
    perturbation_images: int = 200
    methods: tuple[str, ...] = DEFAULT_METHODS
    oracle: bool = True  # also train the shortcut-free model of each seed, the ceiling of every method

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.finetune_masks not in FINETUNE_MASKS:
            raise ValueError(f"finetune_masks must be one of {FINETUNE_MASKS}, got {self.finetune_masks!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if min(self.finetune_per_class, self.val_per_class) < 1:
            raise ValueError(f"finetune_per_class and val_per_class must be at least 1, got "
                             f"{self.finetune_per_class} and {self.val_per_class}")
        if self.finetune_masks == "propagate" and not 1 <= self.annotated_per_class <= self.finetune_per_class:
            raise ValueError(f"annotated_per_class must lie in 1..finetune_per_class ({self.finetune_per_class}), got "
                             f"{self.annotated_per_class}")
        if self.finetune_steps < 0 or (self.finetune_steps and (self.finetune_epochs < 1
                                                                or self.finetune_steps % self.finetune_epochs)):
            raise ValueError(f"finetune_steps must be 0 or a multiple of finetune_epochs ({self.finetune_epochs}: as "
                             f"many steps in each), got {self.finetune_steps}")
        if self.finetune_classes not in FINETUNE_CLASSES:
            raise ValueError(f"finetune_classes must be one of {FINETUNE_CLASSES}, got {self.finetune_classes!r}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")

    def for_family(self, family: str) -> "BenchConfig":
        """This config for ``family``, with that family's calibrated settings (``FAMILY_SETTINGS``)
        wherever this config still holds the default."""
        defaults = {f.name: f.default for f in fields(self)}
        settings = {k: v for k, v in FAMILY_SETTINGS.get(family, {}).items() if getattr(self, k) == defaults[k]}
        return replace(self, family=family, **settings)

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimiser steps in each epoch under a step budget (``finetune_steps``); None without one."""
        return self.finetune_steps // self.finetune_epochs if self.finetune_steps else None

    @property
    def set_a(self) -> tuple[int, ...]:
        """The classes with masked finetuning images."""
        return tuple(range(self.num_classes if self.finetune_classes == "all" else self.num_classes // 2))

    @property
    def set_b(self) -> tuple[int, ...]:
        """The classes without: empty when every class is finetuned."""
        return tuple(range(len(self.set_a), self.num_classes))

    @property
    def val_classes(self) -> tuple[int, ...]:
        """The classes of the validation set: set B, or every class when set B is empty."""
        return self.set_b or self.set_a

    def spurious(self) -> SpuriousConfig:
        return SpuriousConfig(num_classes=self.num_classes, image_size=self.image_size, contrast=self.contrast,
                              family=self.family)

    def original_key(self, seed: int) -> str:
        """Cache key of the original model: the settings it depends on, and the seed."""
        fields = ("family", "num_classes", "image_size", "p", "contrast", "patch_size", "original_attempts", "embed_dim",
                  "depth", "num_heads", "pretrain_images", "pretrain_epochs", "biased_images", "biased_epochs",
                  "train_batch")
        text = json.dumps({k: getattr(self, k) for k in fields} | {"seed": seed}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """The config as JSON-ready data, the derived class sets included."""
    out = asdict(config)
    out["set_a"], out["set_b"] = list(config.set_a), list(config.set_b)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
