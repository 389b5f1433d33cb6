"""Finetuned models in timm's hub layout: ``model.safetensors`` + ``config.json`` with metadata.

``save_finetuned(model, DIR)`` writes what ``timm.create_model('local-dir:DIR', pretrained=True)``
loads; ``config.json`` also carries a ``relevance_finetune`` entry (library version, base model,
finetune config, loss weights), and ``README.md`` is the model card (timm's format). With
``push_to_hub=REPO_ID`` the model then goes to the Hugging Face Hub through timm's
``push_to_hf_hub``. ``relevance-finetune export CHECKPOINT --out DIR [--push-to-hub REPO_ID]`` does
the same for a training checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import timm
import torch
from huggingface_hub.utils import validate_repo_id
from timm.models import push_to_hf_hub
from timm.models._hub import generate_readme
from timm.utils import unwrap_model
from torch import nn

from ._files import give_umask_mode
from ._version import __version__
from .checkpoint import read_checkpoint_info
from .models import create_model, create_model_from_spec, load_weights, loads_source_weights, merge_model_kwargs

__all__ = ["METADATA_KEY", "PushError", "add_arguments", "export_checkpoint", "finetune_metadata", "load_finetuned",
           "model_card", "run", "save_finetuned"]

METADATA_KEY = "relevance_finetune"
_HALF = (0.5, 0.5, 0.5)
_EXPORT_FILES = ("model.safetensors", "config.json", "README.md")
# pretrained_cfg entries that describe the base model's weights: claimed only when the finetune started from them
_WEIGHTS_CLAIMS = ("tag", "license", "license_name", "license_link", "description", "origin_url", "paper_ids",
                   "paper_name", "notes")
# The settings of a run that make its recipe, in the order the model card lists them.
_RECIPE_KEYS = ("preset", "recipe", "method", "classification", "temperature", "second_order", "lr", "weight_decay",
                "lr_decay", "lr_decay_epochs", "epochs", "batch_size", "grad_accum", "amp", "normalization",
                "img_size", "model_kwargs", "seed")
# ... of a head refit without a finetune (no optimiser, no loss weights), and the refit's own
_REFIT_ONLY_KEYS = ("recipe", "normalization", "img_size", "model_kwargs", "seed")
_REFIT_KEYS = ("head_labels", "head_views", "head_fits")
_CITATION = """@inproceedings{chefer2022optimizing,
  title={Optimizing Relevance Maps of Vision Transformers Improves Robustness},
  author={Chefer, Hila and Schwartz, Idan and Wolf, Lior},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}"""
_DFR_CITATION = """@inproceedings{kirichenko2023last,
  title={Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations},
  author={Kirichenko, Polina and Izmailov, Pavel and Wilson, Andrew Gordon},
  booktitle={International Conference on Learning Representations},
  year={2023}
}"""


class PushError(RuntimeError):
    """The Hub push failed; the local export it was made from is complete."""


@contextlib.contextmanager
def _atomic_directory(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory inside ``path`` whose files replace ``path``'s if the block succeeds.

    The temporary directory lives inside the destination, so the moves never cross a file system
    (``path`` may be a mount point). Each file is replaced atomically, ``config.json`` last, so
    timm never reads a config without its weights. Without ``overwrite`` an existing export is refused.
    """
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"export destination {path} exists and is not a directory")
    if not overwrite and any((path / name).exists() for name in _EXPORT_FILES):
        raise FileExistsError(f"{path} already holds an export: pass --overwrite (overwrite=True) to replace it, "
                              "or choose another directory")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".export.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        for file in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            give_umask_mode(file)
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # a failed export leaves no empty directory behind
                path.rmdir()


@contextlib.contextmanager
def _claims(model: nn.Module, from_base: bool) -> Iterator[None]:
    """Within the block, ``model.pretrained_cfg`` names the base's tag and licence only if ``from_base``:
    timm keeps them whether or not those weights were loaded."""
    cfg = model.pretrained_cfg
    if not from_base:
        model.pretrained_cfg = {k: v for k, v in cfg.items() if k not in _WEIGHTS_CLAIMS}
    try:
        yield
    finally:
        model.pretrained_cfg = cfg


def _check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the tensors of ``model`` that hold NaN or inf."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"refusing to export weights with NaN or inf values ({len(bad)} tensor(s): {named}); "
                         "the run diverged: export best.safetensors instead, or resume from an earlier "
                         "checkpoint with a lower lr")


def _base_model_name(model: nn.Module) -> str | None:
    """The architecture, without a pretrained tag: nothing says that the tag's weights were loaded."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(values: Mapping[str, Any]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {key} | {_format(value)} |\n" for key, value in values.items())


def _masks_source(config: Mapping[str, Any]) -> str:
    """Where a run's foreground masks came from, as its settings record it (folder names, not paths)."""
    data = Path(config["data"]) if config.get("data") else None
    if config.get("data_format") == "imagenet-s":
        source = (f"ImageNet-S919 semi-supervised segmentation masks, {config.get('split_classes')} classes x "
                  f"{config.get('images_per_class')} images per class")
    elif config.get("masks"):
        source = f"the mask folder `{Path(config['masks']).name}`"
    elif data is not None and (config.get("data_format") == "csv" or data.suffix == ".csv"):
        source = f"the masks listed in `{data.name}`"
    elif data is not None:
        source = f"the mask folder `{data.name}/masks`"
    else:
        return "not recorded"
    return source + (" (soft: resized bilinearly, not re-binarised)" if config.get("soft_masks") else "")


def _run_metrics(metrics: Mapping[str, Any] | None, refit: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card's entries for the run's metrics: validation ones where the run had validation;
    after a head refit, the refit model's (a finetune's, before the refit, under their own title)."""
    entries: dict[str, Any] = {}
    if refit and refit.get("val_accuracy") is not None:
        entries["Validation metrics (after the head refit)"] = {"accuracy": _format(refit["val_accuracy"])}
    if not metrics:
        return entries or {"Run metrics": "not recorded" if not refit else
                           "none measured after the head refit (its C's scores are in the run's metrics.jsonl)"}
    epoch = f" (epoch {metrics['epoch']})" if "epoch" in metrics else ""
    before = " of the finetune, before the head refit" if refit else ""
    for prefix, title in (("val_", "Validation metrics"), ("train_", "Training metrics, no validation set")):
        chosen = {k[len(prefix):]: _format(v) for k, v in metrics.items() if k.startswith(prefix)}
        if chosen:
            return {**entries, title + before + epoch: chosen}
    return {**entries, "Run metrics" + before + epoch: {k: _format(v) for k, v in metrics.items() if k != "epoch"}}


def model_card(
        metadata: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        evaluations: Mapping[str, str] | None = None,
        probes: Mapping[str, float] | None = None,
        model_id: str | None = None,
        license: str | None = None,
        head_refit: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of an export, as the ``model_card`` dict of timm's ``push_to_hf_hub``.

    Parameters
    ----------
    metadata:
        The ``relevance_finetune`` entry of ``config.json``: base model, finetune config, lambdas.
    metrics:
        The run's metrics at the exported epoch (a ``metrics.jsonl`` record): ``val_*`` are shown,
        ``train_*`` when the run had no validation set.
    evaluations:
        ``{title: markdown}``, e.g. the ``<suite>.md`` tables of ``relevance-finetune evaluate``.
    probes:
        Reliance-probe accuracies, as ``relevance_finetune.probes.reliance_probes`` returns them.
    model_id:
        What the usage example passes to ``timm.create_model`` (``hf-hub:ORG/NAME``, ``local-dir:DIR``).
    license:
        The base model's licence (default ``unknown``: a finetune keeps its base model's terms).
    head_refit:
        The head refit's record (``info["head_refit"]`` of a run's checkpoint): its ``C`` and, with
        validation images, ``val_accuracy`` after the refit, which the card gives as the validation
        metrics (``metrics`` then are the finetune's, before the refit). A config with
        ``finetune: false`` (``--recipe head``) makes a card of the refit alone: no RobustViT
        objective, optimiser settings or loss weights.

    Returns
    -------
    dict
        ``description``, ``details``, ``usage``, ``comparison``, ``citation``, ``tags``, ``license``;
        ``timm.models._hub.generate_readme(card, name)`` renders it as ``README.md``.
    """
    config = metadata.get("finetune_config") or {}
    finetuned = config.get("finetune", True)
    keys = (_RECIPE_KEYS if finetuned else _REFIT_ONLY_KEYS) + (_REFIT_KEYS if config.get("head_refit") else ())
    recipe = {k: config[k] for k in keys if config.get(k) not in (None, {})}
    sections = [f"### {title}\n\n" + "\n".join(  # their headings go two levels down, under the title
        "##" + line if line.startswith("#") else line for line in text.strip().splitlines())
        for title, text in (evaluations or {}).items()]
    if probes:
        sections.append("### Reliance probes\n\nAccuracy (%) on full, object-only and background-only "
                        "images (`relevance_finetune.probes`).\n\n" + _table(probes))
    base = metadata.get("base_model") or "not recorded"
    refit = config.get("head_refit")
    version = metadata.get("library_version", "")
    description = (f"`{base}` finetuned with relevance-finetune {version}: the RobustViT objective (Chefer et al., "
                   "NeurIPS 2022) trains the model's GAE relevance map to lie on the object rather than the "
                   "background." + (f" Its linear head was then refit on {_refit_data(config)} (Deep Feature "
                                    "Reweighting, Kirichenko et al., ICLR 2023)." if refit else "")
                   if finetuned else
                   f"`{base}` with its linear head refit by relevance-finetune {version} on {_refit_data(config)} "
                   "(Deep Feature Reweighting, Kirichenko et al., ICLR 2023): the backbone is unchanged, no "
                   "relevance objective was trained.")
    return {
        "description": description,
        "details": {
            "Base model": base,
            "Recipe": recipe or "not recorded",
            "Loss weights": (metadata.get("lambdas") or "not recorded") if finetuned else "none (no finetune)",
            "Foreground masks": _masks_source(config),
            "Head refit": _head_refit(config, head_refit),
            **_run_metrics(metrics, head_refit if refit else None),
        },
        "usage": f"```python\nimport timm\n\nmodel = timm.create_model({model_id or 'local-dir:DIR'!r}, "
                 "pretrained=True).eval()\n```",
        "comparison": "\n\n".join(sections) if sections else
                      "No evaluation tables or reliance probes were given to the export.",
        "citation": [_CITATION] * finetuned + [_DFR_CITATION] * bool(refit),
        "tags": ["image-classification", "timm", "relevance-finetune"] + ["robustvit"] * finetuned
                + ["deep-feature-reweighting"] * bool(refit),
        "license": license or "unknown",
    }


def _head_refit(config: Mapping[str, Any], record: Mapping[str, Any] | None) -> str:
    """What a run did to the classifier besides the finetune (``--head-refit``, the head recipes)."""
    if not config.get("head_refit"):
        return "none"
    when = "after the finetune" if config.get("finetune", True) else "without a finetune (the backbone unchanged)"
    chosen = ""
    if record and record.get("C") is not None:
        where = {"validation": ", chosen on the validation images' views",
                 "held_out": ", chosen on held-out training images' views",
                 "held_out_validation": ", chosen on held-out halves of the validation groups",
                 "validation_groups": ", chosen by the worst-group accuracy on the validation images"
                 }.get(record.get("selected_on"), "")
        chosen = f"; L1 strength C={_format(float(record['C']))}{where}"
    function = "refit_head_groups" if config.get("head_labels") == "groups" else "refit_head"
    return (f"the linear head refit on {_refit_data(config)} {when} (Deep Feature Reweighting's procedure, "
            f"`relevance_finetune.head.{function}`){chosen}")


def _refit_data(config: Mapping[str, Any]) -> str:
    """What the head refit of a run's ``config`` fitted on."""
    if config.get("head_labels") == "groups":
        return "the validation images with their group labels"
    return "counterfactual views of the masked images"


def _push(
        model: nn.Module,
        repo_id: str,
        private: bool,
        save_kwargs: Mapping[str, Any],
        card: Mapping[str, Any],
        out_dir: Path,
) -> None:
    """``push_to_hf_hub`` with the export's config and card; any failure becomes one ``PushError``."""
    try:
        push_to_hf_hub(model, repo_id, private=private, model_card=dict(card), safe_serialization=True,
                       **save_kwargs)
    except Exception as error:  # offline, no token, HTTP and transport errors of any client: one message
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise PushError(f"could not push to the Hub repository {repo_id!r} ({reason}); the export in {out_dir} "
                        "is complete: upload that folder, or export again with network access") from error


def save_finetuned(
        model: nn.Module,
        out_dir: str | os.PathLike,
        base_model: str | None = None,
        finetune_config: Any = None,
        data_config: Mapping[str, Any] | None = None,
        overwrite: bool = True,
        *,
        metrics: Mapping[str, Any] | None = None,
        evaluations: Mapping[str, str] | None = None,
        probes: Mapping[str, float] | None = None,
        head_refit: Mapping[str, Any] | None = None,
        push_to_hub: str | None = None,
        private: bool = False,
) -> Path:
    """Write ``model`` to ``out_dir`` as ``model.safetensors`` + ``config.json`` (timm's hub layout)
    and its model card ``README.md``; optionally push it to the Hugging Face Hub.

    Parameters
    ----------
    model:
        A timm model (DDP and ``torch.compile`` wrappers are unwrapped).
    out_dir:
        Created if missing; the files are written to a temporary directory inside it first and
        moved in (``out_dir`` may be a mount point).
    base_model:
        The model whose weights the finetune started from, e.g. ``"vit_base_patch16_224.augreg_in21k"``;
        the export then keeps its tag and licence. Default: the architecture alone, without the tag
        and licence of ``model.pretrained_cfg`` (timm names them whether or not those weights were
        loaded), and the card's licence is ``unknown``.
    finetune_config:
        The run's settings (a dataclass such as ``TrainConfig``, or a JSON-serialisable mapping);
        its ``lambda_*`` entries are also listed under ``lambdas``.
    data_config:
        Preprocessing to record instead of the model's own (e.g. ``mean``/``std`` used in training).
    overwrite:
        Replace an existing export in ``out_dir``; False raises ``FileExistsError`` instead.

    The class names in ``model.pretrained_cfg["label_names"]`` (set by the ``train`` command for
    folder datasets) are written as timm's ``label_names``.
    metrics, evaluations, probes, head_refit:
        What the model card reports besides the recipe (see :func:`model_card`); ``head_refit``
        is also kept in ``config.json``'s metadata.
    push_to_hub:
        A Hub repository ``ORG/NAME`` (or ``NAME``) to push to with timm's ``push_to_hf_hub``,
        after the local folder is complete; ``private`` makes a new repository private.

    Returns
    -------
    Path
        ``out_dir``; ``timm.create_model(f"local-dir:{out_dir}", pretrained=True)`` loads it.

    Raises
    ------
    ValueError
        A weight holds NaN or inf (the run diverged); the error names the tensors.
    PushError
        The push failed (e.g. no network); the local export is complete.
    """
    if push_to_hub is not None:
        validate_repo_id(push_to_hub)
    model = unwrap_model(model)
    _check_finite(model)
    if dataclasses.is_dataclass(finetune_config):
        finetune_config = dataclasses.asdict(finetune_config)
    finetune_config = dict(finetune_config or {})
    metadata = {
        "library_version": __version__,
        "base_model": base_model or _base_model_name(model),
        "finetune_config": finetune_config,
        "lambdas": {k: v for k, v in finetune_config.items() if k.startswith("lambda_")},
        **({"head_refit": dict(head_refit)} if head_refit else {}),
    }
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(f"finetune_config must be JSON-serialisable: {error}") from error
    extra = {"data_config": dict(data_config)} if data_config else {}
    model_config: dict[str, Any] = {METADATA_KEY: metadata}
    label_names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if label_names and len(label_names) == model.num_classes:
        model_config["label_names"] = list(label_names)
    out_dir = Path(out_dir)
    with _claims(model, from_base=base_model is not None):
        card = model_card(metadata, metrics, evaluations, probes,
                          f"hf-hub:{push_to_hub}" if push_to_hub else f"local-dir:{out_dir}",
                          (getattr(model, "pretrained_cfg", None) or {}).get("license"), head_refit)
        with _atomic_directory(out_dir, overwrite) as tmp:
            timm.models.save_for_hf(model, tmp, model_config=model_config, safe_serialization=True, **extra)
            readme = generate_readme(card, (push_to_hub or out_dir.resolve().name).split("/")[-1])
            (tmp / "README.md").write_text(readme, encoding="utf-8")
        if push_to_hub is not None:
            _push(model, push_to_hub, private, {"model_config": model_config, **extra}, card, out_dir)
    return out_dir


def load_finetuned(path: str | os.PathLike, **kwargs) -> nn.Module:
    """The model saved by :func:`save_finetuned` in ``path`` (``kwargs`` go to ``timm.create_model``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a model saved by save_finetuned")
    return timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)


def finetune_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``relevance_finetune`` entry of ``path/config.json``: version, base model, config, lambdas."""
    config = json.loads((Path(path) / "config.json").read_text())
    if METADATA_KEY not in config:
        raise ValueError(f"{path}/config.json has no {METADATA_KEY!r} entry: not saved by save_finetuned")
    return config[METADATA_KEY]


def export_checkpoint(
        checkpoint: str | os.PathLike,
        out_dir: str | os.PathLike,
        model_name: str | None = None,
        overwrite: bool = False,
        **card_and_push: Any,
) -> Path:
    """Export a training checkpoint (or any weights file) with :func:`save_finetuned`.

    The model is rebuilt from ``model_name`` if given, else from the model spec the checkpoint
    stores (no access to the model's source: a ``local-dir:`` folder may have moved), else from
    the name its config records (older checkpoints, or models with arguments that JSON cannot
    hold). Weights that do not fit raise ``ValueError`` naming both models; an existing export is
    replaced only with ``overwrite``. The export names the base model (its tag and licence) only
    when the run started from its weights, as :func:`~relevance_finetune.models.loads_source_weights`
    reads the run's settings. The card reports the metrics of the checkpoint's epoch, and its
    head refit's (``info["head_refit"]``) where it has one;
    ``card_and_push`` (``evaluations``, ``probes``, ``push_to_hub``, ``private``) go to
    :func:`save_finetuned`.
    """
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"{checkpoint} does not exist: expected a training checkpoint "
                                "(e.g. RUN/best.safetensors) or, with a model name, a weights file or export folder")
    info = read_checkpoint_info(checkpoint) or {}
    config = info.get("config", {})
    name = model_name or config.get("model")
    spec = info.get("model") or {}
    if model_name is None and spec.get("model_args") is not None:
        model = load_weights(create_model_from_spec(spec), checkpoint)
    elif name is None:
        raise ValueError(f"{checkpoint} does not record its model: pass the timm model name (--model NAME)")
    else:
        kwargs = merge_model_kwargs(config.get("model_kwargs"), img_size=config.get("img_size"),
                                    num_classes=config.get("num_classes"))
        model = create_model(name, checkpoint=checkpoint, **kwargs)
    started_from_weights = model_name is not None or config.get("checkpoint") is not None or (
        name is not None and loads_source_weights(name, bool(config.get("pretrained"))))
    data_config = {"mean": _HALF, "std": _HALF} if config.get("normalization") == "half" else None
    metrics = (info.get("history") or [None])[-1]
    return save_finetuned(model, out_dir, base_model=name if started_from_weights else None,
                          finetune_config=config, data_config=data_config, overwrite=overwrite, metrics=metrics,
                          head_refit=info.get("head_refit"), **card_and_push)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` arguments: ``CHECKPOINT --out DIR [--model NAME] [--overwrite]``."""
    parser.add_argument("checkpoint", help="a training checkpoint (.safetensors), or with --model any weights "
                                           "(.safetensors, .pth, an export folder)")
    parser.add_argument("--out", required=True, help="directory for model.safetensors + config.json")
    parser.add_argument("--model", help="timm model name of the weights (default: the one the checkpoint records)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    _add_card_arguments(parser)


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """``--evaluation FILE ... --probes FILE --push-to-hub REPO_ID --private``."""
    parser.add_argument("--evaluation", nargs="+", default=[], type=Path, metavar="FILE",
                        help="markdown tables for the model card (the <suite>.md files of `evaluate`)")
    parser.add_argument("--probes", type=Path, metavar="JSON",
                        help="reliance-probe accuracies for the model card: {name: percent}, as reliance_probes "
                             "returns them")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="then push the export to this Hugging Face Hub repository (timm's push_to_hf_hub)")
    parser.add_argument("--private", action="store_true", help="make a new Hub repository private")


def _card_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``evaluations`` and ``probes`` of :func:`save_finetuned`, read from the files of ``args``."""
    for path in [*args.evaluation, *([args.probes] if args.probes else [])]:
        if not path.is_file():
            raise FileNotFoundError(f"model card input not found: {path}")
    probes = json.loads(args.probes.read_text()) if args.probes else None
    if probes is not None and not (isinstance(probes, dict) and all(
            isinstance(v, (int, float)) for v in probes.values())):
        raise ValueError(f"{args.probes} must hold a JSON object of accuracies {{name: number}}")
    return {"evaluations": {path.stem: path.read_text() for path in args.evaluation}, "probes": probes}


def run(args: argparse.Namespace) -> int:
    """Run ``relevance-finetune export``."""
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.model, args.overwrite, push_to_hub=args.push_to_hub,
                                private=args.private, **_card_inputs(args))
    except PushError as error:
        print(f"relevance-finetune export: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'model.safetensors'}, {out / 'config.json'} and {out / 'README.md'}; "
          f"load with timm.create_model('local-dir:{out}', pretrained=True)"
          + (f"; pushed to hf-hub:{args.push_to_hub}" if args.push_to_hub else ""))
    return 0
