"""relevance-finetune: optimise the relevance maps of timm vision transformers (RobustViT)."""
from ._version import __version__
from .gae import ATTENTION_FAMILIES, GAEHandle, UnsupportedModelError, attach_gae, explicit_attention
from .export import load_finetuned, save_finetuned
from .head import refit_head, refit_head_groups
from .losses import InputGradientRegularizer, RegularizerOutput, RelevanceRegularizer

__all__ = [
    "ATTENTION_FAMILIES",
    "GAEHandle",
    "InputGradientRegularizer",
    "RegularizerOutput",
    "RelevanceRegularizer",
    "UnsupportedModelError",
    "attach_gae",
    "explicit_attention",
    "load_finetuned",
    "refit_head",
    "refit_head_groups",
    "save_finetuned",
]
