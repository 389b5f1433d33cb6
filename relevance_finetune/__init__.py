"""relevance-finetune: optimise the relevance maps of timm vision transformers (RobustViT)."""
__version__ = "0.1.0"

from .gae import ATTENTION_FAMILIES, GAEHandle, UnsupportedModelError, attach_gae, explicit_attention
from .export import load_finetuned, save_finetuned
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
    "save_finetuned",
]
