"""relevance-finetune: optimise the relevance maps of timm vision transformers (RobustViT)."""
from .gae import ATTENTION_FAMILIES, GAEHandle, UnsupportedModelError, attach_gae, explicit_attention
from .losses import InputGradientRegularizer, RegularizerOutput, RelevanceRegularizer

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_FAMILIES",
    "GAEHandle",
    "InputGradientRegularizer",
    "RegularizerOutput",
    "RelevanceRegularizer",
    "UnsupportedModelError",
    "attach_gae",
    "explicit_attention",
]
