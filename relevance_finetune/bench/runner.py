"""The built-in benchmark: an "original" ViT with a shortcut, finetuned by each method.

One seed of one shortcut family runs: data -> original model and oracle (``originals.py``, cached)
-> for every method, the learning rate (and for the reliance and counterfactual rules the
checkpoint) chosen on the masked validation set by the method's rule -> finetune -> evaluation
(accuracy under shift, relevance-mask agreement, reliance probes, perturbation test).
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..augment import BackgroundSwap
from ..gae import attach_gae
from ..head import HeadRefit, refit_head
from ..losses import InputGradientRegularizer, RelevanceRegularizer
from ..metrics import SegmentationMeter, area_under_curve, perturbation_curve
from ..probes import reliance_probes, replace_region
from .automatic_masks import patch_level, tokencut_splits
from .config import ALL_CLASSES, FAMILY_SETTINGS, FINETUNE_CLASSES, FINETUNE_MASKS, BenchConfig, config_dict
from .methods import DEFAULT_METHODS, EXTENSIONS, METHODS, SELECTIONS, Method
from .originals import accuracy, create_original, normalize, predict, train_oracle, train_original
from .propagated_masks import propagated_splits
from .synthetic import make_split

__all__ = ["ALL_CLASSES", "DEFAULT_METHODS", "EXTENSIONS", "FAMILY_SETTINGS", "FINETUNE_CLASSES", "FINETUNE_MASKS",
           "METHODS", "SELECTIONS", "BenchConfig", "Method", "choose_lr", "config_dict", "counterfactual_images",
           "create_original", "epoch_batches", "evaluate_model", "finetune", "head_refit", "jensen_shannon", "make_data",
           "noisy_masks", "normalize", "patch_masks", "run_seed", "train_oracle", "train_original", "validation_score"]


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
    ``(epochs done, model)`` after every epoch (the same model object, trained on); the epochs'
    batches as ``epoch_batches`` draws them."""
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
        for epoch, batches in enumerate(epoch_batches(len(labels), config, generator)):
            for index in batches:
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


def epoch_batches(count: int, config: BenchConfig, generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """Each epoch's batches of image indices: one pass over the ``count`` images in a fresh order
    (the last batch may be short); under a step budget (``config.finetune_steps``), each epoch's
    ``config.steps_per_epoch`` full batches, cut from one fresh order after another."""
    batch = config.finetune_batch
    if config.steps_per_epoch is None:
        for _ in range(config.finetune_epochs):
            yield list(torch.randperm(count, generator=generator).split(batch))
        return
    stream = torch.zeros(0, dtype=torch.long)
    for _ in range(config.finetune_epochs):
        batches = []
        for _ in range(config.steps_per_epoch):
            while len(stream) < batch:
                stream = torch.cat([stream, torch.randperm(count, generator=generator)])
            batches.append(stream[:batch])
            stream = stream[batch:]
        yield batches


def finetune(original: nn.Module, method: Method, data, lr: float, config: BenchConfig, seed: int) -> nn.Module:
    """A copy of ``original`` finetuned by ``method`` on ``data`` for ``config.finetune_epochs``."""
    model = original
    for _, model in _finetune_epochs(original, method, data, lr, config, seed):
        pass
    return model


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
    logits = predict(model, images)
    score = {"acc": accuracy(logits, labels), "l_cls": F.cross_entropy(logits, logits.argmax(1)).item()}
    if selection == "reliance":
        score["background_only"] = reliance_probes(model, images, masks, labels, normalize)["background_only"]
    if selection == "counterfactual":
        score["counterfactual"] = accuracy(predict(model, counterfactual), labels)
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
    return {name: accuracy(predict(model, data.tensors[0]), data.tensors[2]) for name, data in tests.items()}


def choose_lr(original: nn.Module, method: Method, train, val, config: BenchConfig, seed: int,
              tests: dict | None = None, progress: Callable[[str], None] = lambda message: None):
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
    trial is marked ``"chosen": True``. ``progress`` hears of each learning rate as it starts.
    """
    selection = method.selection
    every_checkpoint = selection in ("reliance", "counterfactual")
    counterfactual = counterfactual_images(val, seed) if selection == "counterfactual" else None
    reference = validation_score(original, val, selection, counterfactual)
    chosen, smallest, trials = None, None, [{"lr": 0.0, "epoch": 0, **reference}]
    if tests:
        trials[0]["test"] = _test_accuracies(original, tests)
    for lr in config.lr_grid:
        progress(f"{method.name}: learning rate {lr:g}")
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
        logits = predict(model, images)
        result[f"{name}_acc"] = accuracy(logits, labels)
        if name == "ood" and config.set_b:
            for set_name, classes in (("set_a", config.set_a), ("set_b", config.set_b)):
                keep = torch.isin(labels, torch.tensor(classes))
                result[f"ood_acc_{set_name}"] = accuracy(logits[keep], labels[keep])
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
    return TensorDataset(images, patch_level(masks, patch_size), *rest)


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


def make_data(config: BenchConfig, seed: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """Finetuning, validation and test sets of ``seed`` (finetuning and validation masks as
    ``config.finetune_masks``; test masks exact). With ``"tokencut"`` or ``"propagate"`` also
    ``"masks"``, the automatic masks' quality (``automatic_masks.tokencut_splits``,
    ``propagated_masks.propagated_splits``), whose source model (and TokenCut's masks) are read
    from (or trained and written to) ``cache_dir``."""
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
    quality = {}
    if config.finetune_masks == "tokencut":
        (train, val), quality["masks"] = tokencut_splits((train, val), config, seed, cache_dir)
    if config.finetune_masks == "propagate":
        (train, val), quality["masks"] = propagated_splits((train, val), config, seed, cache_dir)
    return {
        **quality,
        "train": train,
        "val": val,
        "tests": {
            "id": make_split(config.test_images, "biased", config.p, spurious, seed=base + 5),
            "ood": make_split(config.test_images, "independent", config.p, spurious, seed=base + 6),
            "adv": make_split(config.test_images, "adversarial", config.p, spurious, seed=base + 7),
        },
    }


def _finetuned(original: nn.Module, method: Method, data: dict[str, Any], config: BenchConfig, seed: int,
               ours_lr: float | None, curve_tests: dict, done: list[tuple[Method, tuple]],
               progress: Callable[[str], None]) -> tuple:
    """``method``'s finetune as ``(lr, model, trials, seconds)``: by its rule, or at ours's lr for a
    method that reuses it; the original itself (lr 0) for a method without a finetune; the outcome
    in ``done`` of an equal finetune that ran this seed (its seconds with it)."""
    if not method.finetune:
        return 0.0, original, [], 0.0
    settings = method.finetune_settings()
    for earlier, outcome in done:
        if earlier == settings:
            return outcome
    start = time.perf_counter()
    if method.tune_lr or ours_lr is None:
        lr, model, trials = choose_lr(original, method, data["train"], data["val"], config, seed, curve_tests,
                                      progress)
    else:
        lr, trials = ours_lr, []
        model = finetune(original, method, data["train"], lr, config, seed)
    done.append((settings, (lr, model, trials, time.perf_counter() - start)))
    return done[-1][1]


def head_refit(model: nn.Module, data: dict[str, Any], seed: int) -> tuple[nn.Module, HeadRefit]:
    """A copy of ``model`` whose head is refit (``head.refit_head``) on the finetuning images and
    their counterfactual views, C chosen on the validation images' views (as the counterfactual
    rule selects on them); and what the refit did."""
    model = copy.deepcopy(model)
    images, masks, labels, *_ = data["train"].tensors
    val_images, val_masks, val_labels, *_ = data["val"].tensors
    validation = (normalize(val_images), val_masks, val_labels)
    refit = refit_head(model, normalize(images), masks, labels, validation=validation, seed=seed, progress=False)
    return model, refit


def run_seed(
        config: BenchConfig,
        seed: int,
        cache_dir: Path | None = None,
        progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """All methods for one seed: ``"methods"``: ``{"original": metrics, "oracle": metrics, method:
    metrics | {"lr", "lr_trials", "seconds"}}`` (``"head_C"`` too for a head refit; ``"seconds"``: the
    method's wall time, selection, finetune and refit, without the evaluation); ``"models"`` (the
    models by the same names, for pictures and export); ``"samples"`` (the OOD test set); and with
    automatic masks ``"masks"`` (their quality). Method names live in ``"methods"`` and ``"models"``
    only, so no name can collide with the other entries."""
    refits = [name for name in config.methods if METHODS[name].head_refit]
    if refits and config.set_b:
        raise ValueError(f"methods {refits} refit the head, which needs masked images of every class: "
                         "use --finetune-classes all")
    progress("original model")
    original = train_original(config, seed, cache_dir)
    data = make_data(config, seed, cache_dir)
    results = {"original": evaluate_model(original, data["tests"], config)}
    models = {"original": original}
    if config.oracle:
        progress("oracle")
        models["oracle"] = train_oracle(config, seed, cache_dir)
        results["oracle"] = evaluate_model(models["oracle"], data["tests"], config)
    ours_lr = None
    curve_tests = {split: data["tests"][split] for split in ("id", "ood")}  # recorded per trial, never selected on
    finetunes: list[tuple[Method, tuple]] = []  # this seed's finetunes, shared by methods whose finetunes are equal
    for name in sorted(config.methods, key=lambda n: n != "ours"):  # ours first: others reuse its lr
        progress(name)
        method = METHODS[name]
        lr, model, trials, seconds = _finetuned(original, method, data, config, seed, ours_lr, curve_tests, finetunes,
                                               progress)
        ours_lr = lr if name == "ours" else ours_lr
        extra = {}
        if method.head_refit:
            model, refit = head_refit(model, data, seed)
            seconds, extra["head_C"] = seconds + refit.seconds, refit.C
        results[name] = {**evaluate_model(model, data["tests"], config), "lr": lr, "lr_trials": trials,
                         "seconds": seconds, **extra}
        models[name] = model
    seed_result = {"methods": results, "models": models, "samples": data["tests"]["ood"]}
    if "masks" in data:  # the automatic masks' quality, beside the methods
        seed_result["masks"] = data["masks"]
    return seed_result


