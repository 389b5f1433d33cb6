"""The benchmark's starting points: the original model with a shortcut, and the oracle without one.

Both share a first phase on images whose background is independent of the class; the original's
second phase is biased, the oracle's is not. Each phase is cached under the settings it depends on.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .._files import atomic_path
from .config import BenchConfig
from .synthetic import make_split

__all__ = ["accuracy", "create_original", "normalize", "predict", "train_first_phase", "train_oracle",
           "train_original"]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The benchmark models' input normalisation (mean = std = 0.5)."""
    return (images - 0.5) / 0.5


def create_original(config: BenchConfig) -> nn.Module:
    """The untrained small ViT that plays the pretrained model."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=config.num_classes,
        img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
        depth=config.depth, num_heads=config.num_heads)


def _train_classifier(model: nn.Module, data, epochs: int, lr: float, batch: int, seed: int, desc: str) -> None:
    images, _, labels, _ = data.tensors
    steps_per_epoch = len(labels) // batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(model(normalize(images[index])), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def _object_accuracy(model: nn.Module, config: BenchConfig, seed: int) -> float:
    """Top-1 on fresh images whose background is independent of the class."""
    images, _, labels, _ = make_split(500, "independent", config.p, config.spurious(), seed=1000 * seed + 9).tensors
    return accuracy(predict(model, images), labels)


def _phase_path(cache_dir: Path | None, kind: str, config: BenchConfig, seed: int) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / f"{kind}-{config.original_key(seed)}.safetensors"


def _load_cached(path: Path | None, config: BenchConfig) -> nn.Module | None:
    if path is None or not path.is_file():
        return None
    model = create_original(config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _save_cached(model: nn.Module, path: Path | None) -> None:
    if path is not None:
        with atomic_path(path) as temporary:
            save_file(model.state_dict(), str(temporary))


def train_first_phase(config: BenchConfig, seed: int, cache_dir: Path | None = None) -> nn.Module:
    """The first phase, shared by the original and the oracle: images whose background is
    independent of the class. A ViT sits at chance for a few hundred steps before it finds the
    objects; a phase that ends there (accuracy below twice chance) is restarted from a new
    initialisation, up to ``config.original_attempts`` times in all."""
    path = _phase_path(cache_dir, "objects", config, seed)
    model = _load_cached(path, config)
    if model is not None:
        return model
    unbiased = make_split(config.pretrain_images, "independent", config=config.spurious(), seed=1000 * seed + 1)
    for attempt in range(config.original_attempts):
        torch.manual_seed(seed + 7919 * attempt)
        model = create_original(config)
        _train_classifier(model, unbiased, config.pretrain_epochs, 2e-3, config.train_batch, seed + attempt,
                          "original: objects")
        if _object_accuracy(model, config, seed) >= 200.0 / config.num_classes:
            break
    _save_cached(model, path)
    return model


def _train_two_phase(config: BenchConfig, seed: int, cache_dir: Path | None, kind: str) -> nn.Module:
    """The first phase, then ``config.biased_epochs`` on ``config.biased_images`` images drawn
    biased (``kind="original"``) or with the shortcut independent of the class (``"oracle"``)."""
    path = _phase_path(cache_dir, kind, config, seed)
    model = _load_cached(path, config)
    if model is not None:
        return model
    model = train_first_phase(config, seed, cache_dir)
    distribution = "biased" if kind == "original" else "independent"
    second = make_split(config.biased_images, distribution, config.p, config.spurious(), seed=1000 * seed + 2)
    _train_classifier(model, second, config.biased_epochs, 1e-3, config.train_batch, seed, f"{kind}: second phase")
    _save_cached(model, path)
    return model


def train_original(config: BenchConfig, seed: int, cache_dir: Path | None = None) -> nn.Module:
    """Train (or load from ``cache_dir``) the original model of ``seed``.

    First on images whose background is independent of the class (it learns the objects, as
    far as their contrast lets it), then on the biased set (it learns the background shortcut
    for the objects it cannot read well): the way real pretrained models come to have both.
    A first phase that never found the objects is restarted (``train_first_phase``), since a model
    that never learnt them is no valid starting point.
    """
    return _train_two_phase(config, seed, cache_dir, "original")


def train_oracle(config: BenchConfig, seed: int, cache_dir: Path | None = None) -> nn.Module:
    """The ceiling of ``seed``: the original's architecture, first phase, schedule and number of
    images, its second phase drawn with the shortcut independent of the class. The best OOD a
    finetune can hope for, and the ID accuracy of a model that reads the objects alone."""
    return _train_two_phase(config, seed, cache_dir, "oracle")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(normalize(images[i:i + batch])) for i in range(0, len(images), batch)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()
