"""Finetuned models in timm's hub layout: ``model.safetensors`` + ``config.json`` with metadata.

``save_finetuned(model, DIR)`` writes what ``timm.create_model('local-dir:DIR', pretrained=True)``
loads; ``config.json`` also carries a ``relevance_finetune`` entry (library version, base model,
finetune config, loss weights). ``relevance-finetune export CHECKPOINT --out DIR`` does the same
for a training checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import timm
from timm.utils import unwrap_model
from torch import nn

from . import __version__
from .models import create_model, merge_model_kwargs
from .train import TrainConfig, read_checkpoint_info

__all__ = ["METADATA_KEY", "add_arguments", "export_checkpoint", "finetune_metadata", "load_finetuned", "run",
           "save_finetuned"]

METADATA_KEY = "relevance_finetune"
_HALF = (0.5, 0.5, 0.5)


@contextlib.contextmanager
def _atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``path`` whose files replace ``path``'s if the block succeeds.

    A new ``path`` appears in one rename; in an existing one each file is replaced atomically,
    ``config.json`` last, so timm never reads a config without its weights.
    """
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"export destination {path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            for file in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(file, path / file.name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _base_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part) or None


def save_finetuned(
        model: nn.Module,
        out_dir: str | os.PathLike,
        base_model: str | None = None,
        finetune_config: TrainConfig | Mapping[str, Any] | None = None,
        data_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` as ``model.safetensors`` + ``config.json`` (timm's hub layout).

    Parameters
    ----------
    model:
        A timm model (DDP and ``torch.compile`` wrappers are unwrapped).
    out_dir:
        Created if missing; the files are written to a temporary directory first and moved in.
    base_model:
        The model the finetune started from (default: from ``model.pretrained_cfg``).
    finetune_config:
        The run's settings (a ``TrainConfig`` or a JSON-serialisable mapping); its ``lambda_*``
        entries are also listed under ``lambdas``.
    data_config:
        Preprocessing to record instead of the model's own (e.g. ``mean``/``std`` used in training).

    Returns
    -------
    Path
        ``out_dir``; ``timm.create_model(f"local-dir:{out_dir}", pretrained=True)`` loads it.
    """
    model = unwrap_model(model)
    if dataclasses.is_dataclass(finetune_config):
        finetune_config = dataclasses.asdict(finetune_config)
    finetune_config = dict(finetune_config or {})
    metadata = {
        "library_version": __version__,
        "base_model": base_model or _base_model_name(model),
        "finetune_config": finetune_config,
        "lambdas": {k: v for k, v in finetune_config.items() if k.startswith("lambda_")},
    }
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(f"finetune_config must be JSON-serialisable: {error}") from error
    extra = {"data_config": dict(data_config)} if data_config else {}
    out_dir = Path(out_dir)
    with _atomic_directory(out_dir) as tmp:
        timm.models.save_for_hf(
            model, tmp, model_config={METADATA_KEY: metadata}, safe_serialization=True, **extra)
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
) -> Path:
    """Export a training checkpoint (or any weights file) with :func:`save_finetuned`.

    The model is rebuilt from ``model_name``, else from the name the checkpoint's config records;
    weights that do not fit it raise ``ValueError`` naming both architectures.
    """
    info = read_checkpoint_info(checkpoint) or {}
    config = info.get("config", {})
    name = model_name or config.get("model")
    if name is None:
        raise ValueError(f"{checkpoint} does not record its model: pass the timm model name (--model NAME)")
    kwargs = merge_model_kwargs(config.get("model_kwargs"), img_size=config.get("img_size"),
                                num_classes=config.get("num_classes"))
    model = create_model(name, checkpoint=checkpoint, **kwargs)
    data_config = {"mean": _HALF, "std": _HALF} if config.get("normalization") == "half" else None
    return save_finetuned(model, out_dir, base_model=name, finetune_config=config, data_config=data_config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` arguments: ``CHECKPOINT --out DIR [--model NAME]``."""
    parser.add_argument("checkpoint", help="a training checkpoint (.safetensors), or with --model any weights "
                                           "(.safetensors, .pth, an export folder)")
    parser.add_argument("--out", required=True, help="directory for model.safetensors + config.json")
    parser.add_argument("--model", help="timm model name of the weights (default: the one the checkpoint records)")


def run(args: argparse.Namespace) -> int:
    """Run ``relevance-finetune export``."""
    out = export_checkpoint(args.checkpoint, args.out, args.model)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}; "
          f"load with timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
