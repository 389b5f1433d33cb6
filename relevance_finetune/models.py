"""Model creation for the command line: any ``timm.create_model`` name plus optional weights.

Every command turns ``--model`` / ``--checkpoint`` into a model here: :func:`create_model` (the name,
its weights or not, and a weights file) and :func:`build_model` (pretrained when no checkpoint is
given; a checkpoint may be a training run or export folder, see :func:`find_weights`).

One rule says which weights a name means (:func:`loads_source_weights`), the same in every command:
a ``local-dir:DIR`` or ``hf-hub:ORG/NAME`` name always means its weights; a plain timm name means
its pretrained weights when asked (``--pretrained``); ``--checkpoint`` replaces both; random weights
only when asked (``--random-weights``).

A model's *spec* (:func:`model_spec`) is what rebuilds it without its source: the timm
architecture, the constructor arguments and the pretrained config (preprocessing, label names).
Training checkpoints store it, so they stay usable after a ``local-dir:`` source moves.
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
from torch import nn

from .checkpoint import CHECKPOINT_FORMAT, TRAINER_STATE_PREFIX, open_safetensors
from .gae.recording import check_input_size

__all__ = ["HUB_PREFIXES", "WEIGHT_FILES", "add_model_arguments", "add_weights_arguments", "build_model",
           "create_model", "create_model_from_spec", "find_weights", "load_weights", "loads_source_weights",
           "merge_model_kwargs", "model_spec", "parse_model_kwarg", "unasked_random_weights"]

# pretrained_cfg entries that point at the source of the weights, not at the model
_SOURCE_KEYS = ("file", "source", "url", "hf_hub_id", "hf_hub_filename", "state_dict")
# what find_weights looks for in a folder: an export, a training run
WEIGHT_FILES = ("model.safetensors", "best.safetensors")
# model names that carry their own weights (timm's hub layout, on disk or on the Hub)
HUB_PREFIXES = ("local-dir:", "hf-hub:")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What :func:`create_model_from_spec` needs to rebuild ``model`` (JSON-serialisable).

    ``architecture`` (timm name), ``model_args`` (constructor arguments as timm records them;
    timm versions without ``get_model_args`` give ``num_classes`` only; None when an argument is
    not JSON, e.g. a layer class) and ``pretrained_cfg`` (without the weights' source).
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    get_args = getattr(timm.models, "get_model_args", None)
    args = get_args(model) if get_args is not None else {"num_classes": model.num_classes}
    try:
        args = json.loads(json.dumps(args))
    except (TypeError, ValueError):
        args = None
    return {"architecture": cfg.get("architecture") or type(model).__name__,
            "model_args": args,
            "pretrained_cfg": json.loads(json.dumps({k: v for k, v in cfg.items() if k not in _SOURCE_KEYS},
                                                    default=str))}


def create_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised model as :func:`model_spec` describes it (no file or network access)."""
    return timm.create_model(spec["architecture"], pretrained=False, pretrained_cfg=spec["pretrained_cfg"],
                             **spec["model_args"])


def _describe(architecture: str | None, args: dict[str, Any], other: dict[str, Any]) -> str:
    """``arch (num_classes=3, ...)``: the arguments in which ``args`` differs from ``other`` (if known)."""
    differing = ", ".join(f"{k}={v!r}" for k, v in sorted(args.items()) if other and other.get(k) != v)
    return f"{architecture or 'a model it does not name'}" + (f" ({differing})" if differing else "")


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
    source: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        state, source = _read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as error:
            raise ValueError(f"cannot read {path}: {error} (truncated, or not a torch state dict)") from error
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
    _check_compatible(model, state, path, source)
    model.load_state_dict(state)
    label_names = source.get("label_names")
    if label_names and len(label_names) == getattr(model, "num_classes", None):
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(label_names)}
    return model


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model tensors of ``path`` and what the file (or a config.json beside it) says of their model:
    ``architecture``, ``model_args`` and ``label_names`` where recorded."""
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        checkpoint = metadata.get("format") == CHECKPOINT_FORMAT
        state = {k: f.get_tensor(k) for k in f.keys() if not (checkpoint and k.startswith(TRAINER_STATE_PREFIX))}
    if checkpoint:
        info = json.loads(metadata["info"])
        spec = info.get("model") or {}
        return state, {"architecture": info.get("architecture"), "model_args": spec.get("model_args"),
                       "label_names": spec.get("pretrained_cfg", {}).get("label_names")}
    config = path.with_name("config.json")
    return state, json.loads(config.read_text()) if config.is_file() else {}


def _check_compatible(
        model: nn.Module,
        state: dict[str, torch.Tensor],
        path: Path,
        source: dict[str, Any],
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
        spec = model_spec(model)
        given_args, model_args = source.get("model_args") or {}, spec["model_args"] or {}
        raise ValueError(
            f"{path} holds weights of {_describe(source.get('architecture'), given_args, model_args)}, "
            f"which do not fit the model {_describe(spec['architecture'], model_args, given_args)} "
            f"({type(model).__name__}): " + "; ".join(details))


def loads_source_weights(
        name: str,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        random_weights: bool = False,
) -> bool:
    """Whether ``name``'s own weights are loaded: the one rule of every ``--model`` flag.

    A ``local-dir:`` or ``hf-hub:`` name always means its weights, a plain timm name its pretrained
    weights when ``pretrained``; never when ``checkpoint`` replaces them or ``random_weights`` is asked
    for. Raises ``ValueError`` when ``random_weights`` is combined with other weights.
    """
    if random_weights and (pretrained or checkpoint is not None):
        raise ValueError("random weights exclude --pretrained and --checkpoint: pass one of them")
    return checkpoint is None and not random_weights and (pretrained or name.startswith(HUB_PREFIXES))


def unasked_random_weights(
        name: str,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        random_weights: bool = False,
) -> str | None:
    """A warning when :func:`create_model` would give ``name`` random weights nobody asked for, else None."""
    if random_weights or checkpoint is not None or loads_source_weights(name, pretrained):
        return None
    return (f"warning: {name} without --pretrained or --checkpoint has random weights "
            "(pass --random-weights if that is meant)")


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        random_weights: bool = False,
        **kwargs,
) -> nn.Module:
    """``timm.create_model(name, ...)`` with the weights :func:`loads_source_weights` says, then ``checkpoint``.

    ``name`` takes whatever timm takes, ``local-dir:DIR`` and ``hf-hub:ORG/NAME`` included (their
    weights are loaded unless ``checkpoint`` or ``random_weights`` is given). Weights that cannot be
    read or fetched raise ``RuntimeError`` saying how to load offline; an image size that the patch
    size does not divide (``img_size=30`` with 8-pixel patches) raises ``ValueError`` naming the
    nearest sizes that it does.
    """
    pretrained = loads_source_weights(name, pretrained, checkpoint, random_weights)
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
        if name.startswith("local-dir:"):
            raise RuntimeError(f"cannot load {name!r}: {error} (expected a folder written by timm's "
                               "save_for_hf or relevance-finetune export)") from error
        raise RuntimeError(
            f"could not fetch pretrained weights for {name!r} ({error}). Without network access, "
            "pass a local directory as --model local-dir:DIR, or --checkpoint FILE") from error
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "img_size", None) is not None:  # a size the patches do not divide (--img-size 30)
        check_input_size(patch_embed, tuple(patch_embed.img_size))
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def find_weights(path: str | Path) -> Path:
    """``path`` itself for a file; in a folder, its ``model.safetensors`` or else ``best.safetensors``."""
    path = Path(path)
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no weights at {path}: expected a file, or a folder holding one of {WEIGHT_FILES}")


def build_model(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                **kwargs: Any) -> nn.Module:
    """:func:`create_model` with pretrained weights when the name has them and no checkpoint is given.

    ``checkpoint`` may be a weights file, an export folder or a ``relevance-finetune train`` run folder;
    ``kwargs`` go to ``timm.create_model``.
    """
    weights = None if checkpoint is None else find_weights(checkpoint)
    return create_model(name, pretrained=timm.is_model_pretrained(name), checkpoint=weights,
                        **kwargs).to(device).eval()


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


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--checkpoint FILE``, ``--pretrained`` and ``--random-weights``: the weights of ``--model``
    as :func:`loads_source_weights` reads them."""
    parser.add_argument("--checkpoint", help="weights to load into the model (.safetensors, checkpoint or export "
                                             "dir), instead of the name's own")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--pretrained", action="store_true",
                        help="load a timm name's pretrained weights (local-dir: and hf-hub: names always load theirs)")
    choice.add_argument("--random-weights", action="store_true",
                        help="build the architecture with random weights, ignoring those of the name")


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
