"""Model creation for the command line: any ``timm.create_model`` name plus optional weights."""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "TRAINER_STATE_PREFIX", "create_model", "load_weights"]

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
