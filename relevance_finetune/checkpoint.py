"""Training checkpoints on disk: one ``.safetensors`` file, weights and trainer state together.

The model's state dict is stored under its own keys (so :func:`relevance_finetune.models.load_weights`
and ``timm.models.load_checkpoint`` read it), the optimiser, schedule, grad-scaler and RNG tensors
under ``trainer_state/``, and JSON in the header: ``format`` (:data:`CHECKPOINT_FORMAT`), ``info``
(epoch, architecture, model spec, config, metrics history) and the structure of the trainer state.
Writes are atomic; loading never unpickles, and an unreadable file raises ``ValueError`` naming it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.utils import unwrap_model
from torch import nn

from ._files import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "TRAINER_STATE_PREFIX", "load_checkpoint", "open_safetensors", "read_checkpoint_info",
           "save_checkpoint"]

CHECKPOINT_FORMAT = "relevance_finetune.checkpoint"
TRAINER_STATE_PREFIX = "trainer_state/"


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open(path)``; an unreadable (e.g. truncated) file raises ``ValueError`` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as error:
        raise ValueError(f"cannot read {path}: {error} (truncated, or not a safetensors file)") from error


def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON skeleton of nested dicts/lists/tuples; tensors move to ``tensors`` under ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, tensors, f"{key}/{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {key!r} in a checkpoint")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    items = [_decode(v, tensors) for v in value]
    return items if kind == "list" else tuple(items)


def save_checkpoint(
        path: str | Path,
        model: nn.Module,
        info: dict[str, Any],
        trainer_state: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights (unwrapped from DDP), ``info`` (JSON) and optionally ``trainer_state``
    to one file, atomically.

    ``trainer_state`` is any nesting of dicts, lists, tuples, tensors and JSON scalars
    (optimiser and scheduler state dicts, RNG states).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "info": json.dumps(info)}
    if trainer_state is not None:
        metadata["trainer_state"] = json.dumps(_encode(trainer_state, tensors, TRAINER_STATE_PREFIX.rstrip("/")))
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint_info(path: str | Path) -> dict[str, Any] | None:
    """The JSON ``info`` of a checkpoint (epoch, architecture, config, history), or None for other files."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["info"]) if metadata.get("format") == CHECKPOINT_FORMAT else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint of :func:`save_checkpoint`: ``(model_state, info, trainer_state or None)``."""
    path = Path(path)
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a relevance-finetune checkpoint (no {CHECKPOINT_FORMAT!r} header)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    model_state = {k: v for k, v in tensors.items() if not k.startswith(TRAINER_STATE_PREFIX)}
    trainer_state = None
    if "trainer_state" in metadata:
        trainer_state = _decode(json.loads(metadata["trainer_state"]), tensors)
    return model_state, json.loads(metadata["info"]), trainer_state
