"""Differentiable GAE relevance (Chefer et al., 2021) for timm vision transformers.

``attach_gae(model)`` instruments the attention modules of one model instance so that each
forward records its post-softmax attention maps. ``handle.relevance(logits)`` then turns the
maps of that forward into the relevance row the classifier reads, with one
``torch.autograd.grad`` call over all maps and a row-vector rollout (O(L N^2)).
With ``attention="fused"`` the model keeps its fused SDPA attention and the forward records
SDPA's inputs and output instead; the rollout rebuilds the maps in row chunks (see ``fused.py``).

- :mod:`.families`: the supported attention modules (``ATTENTION_FAMILIES``) and readouts;
- :mod:`.recording`: the hooks that record each block's attention call in a forward;
- :mod:`.rollout`: the GAE rule from one forward's records and logits;
- :mod:`.maps`: normalisation and upsampling of relevance maps;
- :mod:`.handle`: ``GAEHandle`` and ``attach_gae``.
"""
from .families import ATTENTION_FAMILIES, AttentionFamily, UnsupportedModelError, explicit_attention
from .handle import GAEHandle, attach_gae
from .maps import normalize_relevance, upsample_relevance
from .recording import AUTO_FUSED_TOKENS

__all__ = [
    "AUTO_FUSED_TOKENS",
    "AttentionFamily",
    "ATTENTION_FAMILIES",
    "GAEHandle",
    "UnsupportedModelError",
    "attach_gae",
    "explicit_attention",
    "normalize_relevance",
    "upsample_relevance",
]
