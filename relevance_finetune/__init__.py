"""relevance-finetune: optimise the relevance maps of timm vision transformers (RobustViT).

The public names load on first use (PEP 562): importing the package, as the command line does,
imports neither torch nor timm, so a command can report a broken install in one line.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .export import load_finetuned, save_finetuned
    from .gae import ATTENTION_FAMILIES, GAEHandle, UnsupportedModelError, attach_gae, explicit_attention
    from .head import refit_head, refit_head_groups
    from .losses import InputGradientRegularizer, RegularizerOutput, RelevanceRegularizer

# public name -> the module that defines it
_PUBLIC = {
    "ATTENTION_FAMILIES": ".gae",
    "GAEHandle": ".gae",
    "InputGradientRegularizer": ".losses",
    "RegularizerOutput": ".losses",
    "RelevanceRegularizer": ".losses",
    "UnsupportedModelError": ".gae",
    "attach_gae": ".gae",
    "explicit_attention": ".gae",
    "load_finetuned": ".export",
    "refit_head": ".head",
    "refit_head_groups": ".head",
    "save_finetuned": ".export",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
