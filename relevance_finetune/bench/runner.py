"""The built-in benchmark: an "original" ViT with a shortcut, finetuned by each method.

One seed of one shortcut family runs: data -> original model (trained on unbiased, then on
biased data, cached) -> for every method, the learning rate (and for the reliance rule the
checkpoint) chosen on the masked validation set by the method's rule -> finetune -> evaluation
(accuracy under shift, relevance-mask agreement, reliance probes, perturbation test).
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .. import recipes
from .._files import atomic_path
from ..augment import BackgroundSwap
from ..gae import attach_gae
from ..losses import InputGradientRegularizer, RelevanceRegularizer
from ..metrics import SegmentationMeter, area_under_curve, perturbation_curve
from ..probes import reliance_probes, replace_region
from .synthetic import FAMILIES, SpuriousConfig, make_split

__all__ = ["ALL_CLASSES", "DEFAULT_METHODS", "EXTENSIONS", "FAMILY_SETTINGS", "FINETUNE_CLASSES", "FINETUNE_MASKS",
           "METHODS", "BenchConfig", "Method", "noisy_masks", "patch_masks", "run_seed", "train_oracle",
           "train_original"]


# How a method's learning rate and checkpoint are chosen on the masked validation images: the paper's
# rule, the reliance rule (lowest background-only accuracy within the accuracy limit), or the
# counterfactual rule (highest accuracy on the validation objects moved onto each other's backgrounds).
SELECTIONS = ("paper", "reliance", "counterfactual")


@dataclass(frozen=True)
class Method:
    """A finetuning method: the relevance loss with settings, or an input-gradient baseline."""

    name: str
    loss: str = "relevance"  # "relevance" | "gradmask" | "rrr"
    kwargs: dict[str, Any] = field(default_factory=dict)
    second_order: bool = False
    description: str = ""
    tune_lr: bool = False  # pick its own lr by its rule; otherwise reuse ours's (Table 4)
    consistency: float = 0.0  # extension, not the paper's: weight of the object-consistency term
    background_swap: float = 0.0  # probability of moving each object onto another image's background
    paired: bool = False  # every batch holds each image and its counterfactual (twice the images per step)
    jsd: float = 0.0  # paired only: weight of the Jensen-Shannon divergence between the two views' predictions
    selection: str = "paper"  # lr (and checkpoint) rule on the validation set: one of SELECTIONS

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if (self.paired or self.jsd) and not self.background_swap:
            raise ValueError(f"method {self.name!r}: paired views and the JSD term need background_swap > 0")
        if self.jsd and not self.paired:
            raise ValueError(f"method {self.name!r}: the JSD term compares paired views: set paired=True")

    @classmethod
    def from_recipe(cls, name: str, recipe: recipes.Recipe, description: str, **loss: Any) -> "Method":
        """The benchmark's method for ``recipe`` (``loss`` overrides its regulariser settings)."""
        if recipe.object_only:
            raise ValueError("the benchmark's methods take no object-only images")
        return cls(name, kwargs={**recipe.loss, **loss}, description=description, tune_lr=True,
                   background_swap=recipe.background_swap, selection=recipe.selection)


def _counterfactual_rule(name: str, description: str, relevance: bool = False, background_swap: float = 1.0,
                         **changes: Any) -> Method:
    """The recommended recipe's swap and loss (without its relevance terms unless ``relevance``),
    lr and checkpoint chosen by the counterfactual rule."""
    recipe = recipes.get("recommended").replace(background_swap=background_swap)
    method = Method.from_recipe(name, recipe, description, **({} if relevance else {"lambda_relevance": 0.0}))
    return replace(method, selection="counterfactual", **changes)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ours", description="paper loss (Eq. 5), confidence boosting", tune_lr=True),
    Method("ours_ground_truth", kwargs=dict(classification="ground_truth"),
           description="paper loss, CE with the labels (Table 4)"),
    Method("control", kwargs=dict(lambda_relevance=0.0),
           description="confidence CE alone: the same finetune without relevance terms"),
    Method("gradmask", loss="gradmask", description="GradMask (input-gradient mask penalty + CE)", tune_lr=True),
    Method("rrr", loss="rrr", description="Right for the Right Reasons (+ CE)", tune_lr=True),
    Method("wo_classification", kwargs=dict(lambda_classification=0.0), description="w/o L_cls"),
    Method("wo_bg", kwargs=dict(lambda_bg=0.0), description="w/o L_bg"),
    Method("wo_fg", kwargs=dict(lambda_fg=0.0), description="w/o L_fg"),
    Method("only_bg", kwargs=dict(lambda_fg=0.0, lambda_classification=0.0), description="only L_bg"),
    Method("only_fg", kwargs=dict(lambda_bg=0.0, lambda_classification=0.0), description="only L_fg"),
    Method("ours_second_order", second_order=True, description="paper loss, second-order GAE"),
    Method("ext_object_consistency", consistency=1.0,
           description="EXTENSION, not the paper's: paper loss + KL(object-only prediction || prediction)"),
    Method.from_recipe("swap", recipes.get("recommended"), lambda_relevance=0.0,
                       description="counterfactual images alone: the recommended recipe without relevance terms"),
    Method.from_recipe("recommended", recipes.get("recommended"),
                       description="the recommended recipe (recipes.get('recommended'))"),
    Method.from_recipe("swap_p50", recipes.get("recommended").replace(background_swap=0.5), lambda_relevance=0.0,
                       description="counterfactual images alone, each object swapped with probability 0.5"),
    Method.from_recipe("recommended_p50", recipes.get("recommended").replace(background_swap=0.5),
                       description="the recommended recipe with swap probability 0.5"),
    # the ceiling study (docs/benchmark.md): the counterfactual selection rule, views, consistency
    _counterfactual_rule("swap_cf", "counterfactual images alone, lr and checkpoint by counterfactual validation "
                                    "accuracy"),
    _counterfactual_rule("recommended_cf", "swap_cf with the relevance terms (the paper's weights)", relevance=True),
    _counterfactual_rule("swap_p50_cf", "swap_cf with each object swapped with probability 0.5", background_swap=0.5),
    _counterfactual_rule("paired_cf", "swap_cf with each image and its counterfactual in the same batch", paired=True),
    _counterfactual_rule("paired_jsd_cf", "paired_cf + 12 x JSD between the two views' predictions (AugMix's weight)",
                         paired=True, jsd=12.0),
)}
EXTENSIONS = tuple(name for name in METHODS if name.startswith("ext_"))
# the comparison every family runs; the Table 4 ablations and extensions on request
DEFAULT_METHODS = ("ours", "control", "gradmask", "rrr", "swap", "recommended")


# Each family's schedule of the original where it differs from the defaults: measured so that the
# original learns both the objects and the shortcut (docs/benchmark.md), fixed before any method ran.
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {"texture": dict(biased_epochs=8)}
# Which classes get masked finetuning images: half of them (the paper's set A, validated on the
# other half, set B), or all of them (a user who has masks for every class, validated on held-out
# images of every class).
FINETUNE_CLASSES = ("half", "all")
# The masks the finetune and its validation see: the generator's exact ones, every patch the object
# touches (a patch-level mask, as TokenCut gives), which carries background pixels along the outline, or
# noisy ones (patch-level, grown or shrunk by 2 patches, a fifth of them another image's: see noisy_masks).
FINETUNE_MASKS = ("exact", "patch", "noisy")
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
    finetune_masks: str = "exact"  # "exact", or "patch": every patch the object touches (TokenCut's resolution)
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
    return _accuracy(_predict(model, images), labels)


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


def _train_objects(config: BenchConfig, seed: int, cache_dir: Path | None) -> nn.Module:
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
    model = _train_objects(config, seed, cache_dir)
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
    A first phase that never found the objects is restarted (``_train_objects``), since a model
    that never learnt them is no valid starting point.
    """
    return _train_two_phase(config, seed, cache_dir, "original")


def train_oracle(config: BenchConfig, seed: int, cache_dir: Path | None = None) -> nn.Module:
    """The ceiling of ``seed``: the original's architecture, first phase, schedule and number of
    images, its second phase drawn with the shortcut independent of the class. The best OOD a
    finetune can hope for, and the ID accuracy of a model that reads the objects alone."""
    return _train_two_phase(config, seed, cache_dir, "oracle")


def jensen_shannon(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon divergence between the softmax of two (B, classes) logits, batch mean."""
    p, q = logits.softmax(1), other.softmax(1)
    log_mixture = ((p + q) / 2).clamp(min=1e-7).log()
    return (F.kl_div(log_mixture, p, reduction="batchmean") + F.kl_div(log_mixture, q, reduction="batchmean")) / 2


def _loss_fn(method: Method, model: nn.Module, gae, scale: float) -> Callable:
    """(images, masks, labels) -> loss for one finetuning step."""
    if method.loss == "relevance":
        criterion = RelevanceRegularizer(gae, **method.kwargs)

        def relevance_loss(images, masks, labels):
            logits = model(normalize(images))
            loss = criterion(logits, masks, labels).loss
            if method.jsd:  # a paired batch: the first half the images, the second their counterfactuals
                loss = loss + method.jsd * jensen_shannon(*logits.chunk(2))
            if method.consistency:  # the relevance above is computed: a second forward may follow
                with torch.no_grad():
                    teacher = model(normalize(replace_region(images, masks, "background", "grey"))).softmax(1)
                consistency = F.kl_div(F.log_softmax(logits, 1), teacher, reduction="batchmean")
                loss = loss + method.consistency * consistency
            return loss
        return relevance_loss
    criterion = InputGradientRegularizer(method.loss, lambda_mask=scale)

    def input_gradient_loss(images, masks, labels):
        inputs = normalize(images).requires_grad_(True)
        return criterion(model(inputs), inputs, masks, labels).loss
    return input_gradient_loss


def _baseline_scale(method: Method, model: nn.Module, data, config: BenchConfig) -> float:
    """Weight of an input-gradient penalty: ``baseline_lambda`` x (initial CE / initial penalty)."""
    if method.loss == "relevance":
        return 1.0
    images, masks, labels, _ = data.tensors
    inputs = normalize(images[:64]).requires_grad_(True)
    out = InputGradientRegularizer(method.loss)(model(inputs), inputs, masks[:64], labels[:64])
    return config.baseline_lambda * out.classification.item() / max(out.mask_penalty.item(), 1e-12)


def _finetune_epochs(original: nn.Module, method: Method, data, lr: float, config: BenchConfig,
                     seed: int) -> Iterator[tuple[int, nn.Module]]:
    """Finetune a copy of ``original`` by ``method`` with AdamW and the paper's decay, yielding
    ``(epochs done, model)`` after every epoch (the same model object, trained on)."""
    model = copy.deepcopy(original)
    images, masks, labels, _ = data.tensors
    swap = BackgroundSwap(method.background_swap, seed=seed) if method.background_swap else None
    with attach_gae(model, second_order=method.second_order) as gae, warnings.catch_warnings():
        if config.finetune_masks == "noisy":  # eroded masks may be empty: the swap leaves those images alone
            warnings.filterwarnings("ignore", message="BackgroundSwap:")
        scale = _baseline_scale(method, model, data, config)
        loss_fn = _loss_fn(method, model, gae, scale)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.85 ** (epoch // 2))
        generator = torch.Generator().manual_seed(seed)
        model.eval()  # dropout and drop-path are 0; eval keeps the model deterministic
        for epoch in range(config.finetune_epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), config.finetune_batch):
                index = order[start:start + config.finetune_batch]
                batch_images, batch_masks, batch_labels = images[index], masks[index], labels[index]
                if swap is not None:
                    swapped, _ = swap(batch_images, batch_masks)
                    if method.paired:
                        batch_images, batch_masks = torch.cat([batch_images, swapped]), batch_masks.repeat(2, 1, 1)
                        batch_labels = batch_labels.repeat(2)
                    else:
                        batch_images = swapped
                loss = loss_fn(batch_images, batch_masks, batch_labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
            yield epoch + 1, model


def finetune(original: nn.Module, method: Method, data, lr: float, config: BenchConfig, seed: int) -> nn.Module:
    """A copy of ``original`` finetuned by ``method`` on ``data`` for ``config.finetune_epochs``."""
    model = original
    for _, model in _finetune_epochs(original, method, data, lr, config, seed):
        pass
    return model


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(normalize(images[i:i + batch])) for i in range(0, len(images), batch)])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def counterfactual_images(data: TensorDataset, seed: int) -> torch.Tensor:
    """Every image's object on another image of ``data``'s background (one fixed draw): masked
    validation images whose shortcut no longer goes with their class, as out of distribution."""
    images, masks, *_ = data.tensors
    with warnings.catch_warnings():  # images without an object (or background) to move stay as they are
        warnings.filterwarnings("ignore", message="BackgroundSwap:")
        return BackgroundSwap(1.0, seed=seed)(images, masks)[0]


def validation_score(model: nn.Module, data, selection: str = "paper",
                     counterfactual: torch.Tensor | None = None) -> dict[str, float]:
    """Validation accuracy and confidence CE (L_cls), the quantities of the paper's lr rule; for
    the reliance rule the background-only accuracy (mean over the fills), for the counterfactual
    rule the accuracy on ``counterfactual`` (``data``'s images, their objects on other backgrounds)."""
    images, masks, labels, _ = data.tensors
    logits = _predict(model, images)
    score = {"acc": _accuracy(logits, labels), "l_cls": F.cross_entropy(logits, logits.argmax(1)).item()}
    if selection == "reliance":
        score["background_only"] = reliance_probes(model, images, masks, labels, normalize)["background_only"]
    if selection == "counterfactual":
        score["counterfactual"] = _accuracy(_predict(model, counterfactual), labels)
    return score


def _selection_key(score: dict[str, float], lr: float, selection: str) -> tuple[float, ...]:
    """Higher is better: the lr (paper), the lowest background-only accuracy (reliance), the highest
    counterfactual accuracy (counterfactual); ties go to the higher validation accuracy."""
    if selection == "reliance":
        return -score["background_only"], score["acc"]
    if selection == "counterfactual":
        return score["counterfactual"], score["acc"]
    return (lr,)


def _passes(score: dict[str, float], reference: dict[str, float], config: BenchConfig, selection: str) -> bool:
    if selection == "counterfactual":  # its accuracy on shifted images already prices the ID it gives up
        return True
    if score["acc"] < reference["acc"] - config.max_val_drop:
        return False
    return selection == "reliance" or score["l_cls"] <= reference["l_cls"] + 1e-6


def _test_accuracies(model: nn.Module, tests: dict) -> dict[str, float]:
    return {name: _accuracy(_predict(model, data.tensors[0]), data.tensors[2]) for name, data in tests.items()}


def choose_lr(original: nn.Module, method: Method, train, val, config: BenchConfig, seed: int,
              tests: dict | None = None):
    """The learning rate (and model) by ``method.selection``. Returns (lr, model, trials); the
    first trial (lr 0) is the original model. With ``tests`` (name -> split) every trial also
    records its test accuracies under ``"test"``, for the trade-off curve; the rules never read them.

    ``"paper"``: the highest lr whose final model's validation accuracy falls by at most
    ``max_val_drop`` points and whose L_cls does not increase. ``"reliance"``: among the models
    every ``select_every`` epochs of every lr, the lowest validation background-only accuracy
    whose accuracy falls by at most ``max_val_drop`` points (ties: the higher accuracy).
    ``"counterfactual"``: among the same models, the highest accuracy on the validation objects
    moved onto each other's backgrounds (ties: the higher accuracy), with no accuracy limit. When
    nothing passes, the smallest lr's final model (its model is kept, not retrained). The chosen
    trial is marked ``"chosen": True``.
    """
    selection = method.selection
    every_checkpoint = selection in ("reliance", "counterfactual")
    counterfactual = counterfactual_images(val, seed) if selection == "counterfactual" else None
    reference = validation_score(original, val, selection, counterfactual)
    chosen, smallest, trials = None, None, [{"lr": 0.0, "epoch": 0, **reference}]
    if tests:
        trials[0]["test"] = _test_accuracies(original, tests)
    for lr in config.lr_grid:
        for epoch, model in _finetune_epochs(original, method, train, lr, config, seed):
            last = epoch == config.finetune_epochs
            if not last and not (every_checkpoint and epoch % config.select_every == 0):
                continue
            score = validation_score(model, val, selection, counterfactual)
            trials.append({"lr": lr, "epoch": epoch, **score})
            if tests:
                trials[-1]["test"] = _test_accuracies(model, tests)
            key = _selection_key(score, lr, selection)
            if _passes(score, reference, config, selection) and (chosen is None or key > chosen[0]):
                chosen = (key, lr, _state(model), trials[-1])
            if last and lr == min(config.lr_grid):
                smallest = (None, lr, _state(model), trials[-1])
    # nothing passes: the smallest lr is the most conservative choice (its model is kept, not retrained)
    _, lr, state, trial = chosen or smallest
    trial["chosen"] = True
    model = copy.deepcopy(original)
    model.load_state_dict(state)
    return lr, model, trials


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def evaluate_model(model: nn.Module, tests: dict, config: BenchConfig) -> dict[str, Any]:
    """Accuracy under shift, relevance-mask agreement on OOD images, reliance probes, perturbation."""
    result: dict[str, Any] = {}
    for name, data in tests.items():
        images, _, labels, _ = data.tensors
        logits = _predict(model, images)
        result[f"{name}_acc"] = _accuracy(logits, labels)
        if name == "ood" and config.set_b:
            for set_name, classes in (("set_a", config.set_a), ("set_b", config.set_b)):
                keep = torch.isin(labels, torch.tensor(classes))
                result[f"ood_acc_{set_name}"] = _accuracy(logits[keep], labels[keep])
    images, masks, labels, _ = tests["ood"].tensors
    meter, maps = SegmentationMeter(), []
    with attach_gae(model) as gae:
        for start in range(0, len(images), 250):
            maps.append(gae.explain(normalize(images[start:start + 250])))
            meter.update(maps[-1], masks[start:start + 250])
    result.update({k: v for k, v in meter.compute().items() if k != "images"})
    count = config.perturbation_images  # the perturbation test reuses the first images' maps
    probe_images, probe_labels, relevance = normalize(images[:count]), labels[:count], torch.cat(maps)[:count]
    fractions = tuple(i / 10 for i in range(1, 10))
    for mode in ("positive", "negative"):
        curve = perturbation_curve(model, probe_images, probe_labels, relevance, fractions, mode)
        result[f"perturbation_{mode}_auc"] = area_under_curve(fractions, curve) / (fractions[-1] - fractions[0])
    images, masks, labels, _ = tests["id"].tensors
    result["probes"] = reliance_probes(model, images, masks, labels, normalize)
    return result


def patch_masks(data: TensorDataset, patch_size: int) -> TensorDataset:
    """``data`` with each mask grown to every patch it touches."""
    images, masks, *rest = data.tensors
    coarse = F.max_pool2d(masks[:, None], patch_size)
    return TensorDataset(images, F.interpolate(coarse, scale_factor=patch_size, mode="nearest")[:, 0], *rest)


def noisy_masks(data: TensorDataset, patch_size: int, seed: int, grow: int = 2,
                replaced: float = 0.2) -> TensorDataset:
    """``data`` with rough masks: patch-level, each dilated or eroded (even odds) by ``grow`` patches
    (an eroded small object may vanish), then a ``replaced`` share of them swapped for another
    image's mask (a segmenter that found the wrong thing). Seeded by ``seed``."""
    images, masks, *rest = data.tensors
    generator = torch.Generator().manual_seed(seed)
    coarse = F.max_pool2d(masks[:, None], patch_size)
    window = 2 * grow + 1
    dilated = F.max_pool2d(F.pad(coarse, (grow,) * 4, value=0.0), window, stride=1)
    eroded = 1 - F.max_pool2d(F.pad(1 - coarse, (grow,) * 4, value=1.0), window, stride=1)
    count = len(masks)
    noisy = torch.where((torch.rand(count, generator=generator) < 0.5).view(-1, 1, 1, 1), dilated, eroded)
    wrong = torch.rand(count, generator=generator) < replaced
    other = (torch.arange(count) + torch.randint(1, max(count, 2), (count,), generator=generator)) % count
    noisy[wrong] = noisy[other[wrong]]
    return TensorDataset(images, F.interpolate(noisy, scale_factor=patch_size, mode="nearest")[:, 0], *rest)


def make_data(config: BenchConfig, seed: int) -> dict[str, Any]:
    """Finetuning, validation and test sets of ``seed`` (finetuning and validation masks as
    ``config.finetune_masks``; test masks exact)."""
    spurious = config.spurious()
    base = 1000 * seed
    train_distribution = config.finetune_distribution
    train = make_split(config.finetune_per_class * len(config.set_a), train_distribution, config.p, spurious,
                       seed=base + 3, classes=config.set_a)
    val = make_split(config.val_per_class * len(config.val_classes), train_distribution, config.p, spurious,
                     seed=base + 4, classes=config.val_classes)
    if config.finetune_masks == "patch":
        train, val = patch_masks(train, config.patch_size), patch_masks(val, config.patch_size)
    if config.finetune_masks == "noisy":
        train, val = (noisy_masks(split, config.patch_size, base + offset) for split, offset in ((train, 3), (val, 4)))
    return {
        "train": train,
        "val": val,
        "tests": {
            "id": make_split(config.test_images, "biased", config.p, spurious, seed=base + 5),
            "ood": make_split(config.test_images, "independent", config.p, spurious, seed=base + 6),
            "adv": make_split(config.test_images, "adversarial", config.p, spurious, seed=base + 7),
        },
    }


def run_seed(
        config: BenchConfig,
        seed: int,
        cache_dir: Path | None = None,
        progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """All methods for one seed: ``{"original": metrics, "oracle": metrics, method: metrics | {"lr",
    "lr_trials"}}``
    plus ``"models"`` (the finetuned models, for pictures and export)."""
    progress("original model")
    original = train_original(config, seed, cache_dir)
    data = make_data(config, seed)
    results = {"original": evaluate_model(original, data["tests"], config)}
    models = {"original": original}
    if config.oracle:
        progress("oracle")
        models["oracle"] = train_oracle(config, seed, cache_dir)
        results["oracle"] = evaluate_model(models["oracle"], data["tests"], config)
    ours_lr = None
    curve_tests = {split: data["tests"][split] for split in ("id", "ood")}  # recorded per trial, never selected on
    for name in sorted(config.methods, key=lambda n: n != "ours"):  # ours first: others reuse its lr
        progress(name)
        method = METHODS[name]
        if method.tune_lr or ours_lr is None:
            lr, model, trials = choose_lr(original, method, data["train"], data["val"], config, seed, curve_tests)
        else:
            lr, trials = ours_lr, []
            model = finetune(original, method, data["train"], lr, config, seed)
        ours_lr = lr if name == "ours" else ours_lr
        results[name] = {**evaluate_model(model, data["tests"], config), "lr": lr, "lr_trials": trials}
        models[name] = model
    results["models"] = models
    results["samples"] = data["tests"]["ood"]
    return results


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """The config as JSON-ready data, the derived class sets included."""
    out = asdict(config)
    out["set_a"], out["set_b"] = list(config.set_a), list(config.set_b)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
