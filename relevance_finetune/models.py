"""Model creation for the command line: any ``timm.create_model`` name plus optional weights.

``--model-kwargs KEY=VALUE ...`` and ``--img-size N`` follow timm's own ``train.py``: each value is
read as a Python literal where it parses (``depth=2``, ``drop_path_rate=0.1``, ``img_size=(224, 160)``)
and kept as a string otherwise (``global_pool=avg``).
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from safetensors import safe_open
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "TRAINER_STATE_PREFIX", "add_model_arguments", "create_model", "load_weights",
           "merge_model_kwargs", "parse_model_kwarg"]

# The header of a training checkpoint (relevance_finetune.train): model tensors under their own
# keys, optimiser/RNG tensors under TRAINER_STATE_PREFIX, JSON "info" with the architecture.
CHECKPOINT_FORMAT = "relevance_finetune.checkpoint"
TRAINER_STATE_PREFIX = "trainer_state/"


def load_weights(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load weights into ``model``: a ``.safetensors`` file (a training checkpoint included), a
    timm/torch state dict, or an exported directory.

    A directory is read as ``DIR/model.safetensors``. Raises ``ValueError`` naming both
    architectures when the weights belong to another model.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    source = None
    if path.suffix == ".safetensors":
        state, source = _read_safetensors(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
    _check_compatible(model, state, path, source)
    model.load_state_dict(state)
    return model


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The model tensors of ``path`` and their architecture, where the file or a config.json beside it says."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        checkpoint = metadata.get("format") == CHECKPOINT_FORMAT
        state = {k: f.get_tensor(k) for k in f.keys() if not (checkpoint and k.startswith(TRAINER_STATE_PREFIX))}
    if checkpoint:
        return state, json.loads(metadata["info"]).get("architecture")
    config = path.with_name("config.json")
    return state, json.loads(config.read_text()).get("architecture") if config.is_file() else None


def _check_compatible(
        model: nn.Module,
        state: dict[str, torch.Tensor],
        path: Path,
        source: str | None = None,
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if mismatched:
            k = mismatched[0]
            details.append(f"{len(mismatched)} shape mismatches (e.g. {k}: model {expected[k]}, file {given[k]})")
        raise ValueError(
            f"{path} ({source or 'architecture not recorded'}) does not fit this {type(model).__name__} "
            f"({getattr(model, 'default_cfg', {}).get('architecture', '?')}): " + "; ".join(details))


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        **kwargs,
) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)``, then ``checkpoint`` if given.

    ``name`` takes whatever timm takes, ``local-dir:DIR`` and ``hf-hub:ORG/NAME`` included.
    A pretrained download that fails raises ``RuntimeError`` saying how to load offline.
    """
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        if not kwargs:
            raise
        raise ValueError(f"timm model {name!r} does not take the arguments {kwargs}: {error}") from error
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"timm has no model named {name!r}") from error
        raise
    except (OSError, ConnectionError) as error:
        raise RuntimeError(
            f"could not fetch pretrained weights for {name!r} ({error}). Without network access, "
            "pass a local directory as --model local-dir:DIR, or --checkpoint FILE") from error
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def parse_model_kwarg(item: str) -> tuple[str, Any]:
    """``'KEY=VALUE'`` -> ``(KEY, value)``: a Python literal where ``VALUE`` parses, else the string.

    The rule of timm's ``train.py --model-kwargs``. Raises ``argparse.ArgumentTypeError`` (the
    command's one-line error) when there is no ``=`` or ``KEY`` is not a Python name.
    """
    key, sep, text = item.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a keyword of timm.create_model, got {item!r}")
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _KeyValues(argparse.Action):
    """Collect the ``(key, value)`` pairs of :func:`parse_model_kwarg` into one dict."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, dict(values))


def add_model_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Add ``--model-kwargs KEY=VALUE ...`` and ``--img-size N`` (``defaults``: e.g. ``default=SUPPRESS``)."""
    parser.add_argument("--model-kwargs", nargs="*", type=parse_model_kwarg, action=_KeyValues, metavar="KEY=VALUE",
                        **{"default": {}, **defaults},
                        help="more timm.create_model arguments, as timm's train.py takes them "
                             "(e.g. drop_path_rate=0.1 global_pool=avg)")
    parser.add_argument("--img-size", type=_positive_int, metavar="N", **{"default": None, **defaults},
                        help="build the model for N x N images (timm resamples pretrained position "
                             "embeddings); the data follow the model")


def merge_model_kwargs(model_kwargs: Mapping[str, Any] | None = None, **named: Any) -> dict[str, Any]:
    """``model_kwargs`` with each of ``named`` (``img_size=``, ``num_classes=``) that is not None.

    Raises ``ValueError`` when a name is given both ways with different values.
    """
    merged = dict(model_kwargs or {})
    for key, value in named.items():
        if value is None:
            continue
        if key in merged and merged[key] != value:
            raise ValueError(f"{key} is given twice: {value!r}, and {merged[key]!r} in the model kwargs")
        merged[key] = value
    return merged
