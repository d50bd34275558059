"""Models registered into MMDetection's ``MODELS`` registry."""
from .efficientvit import EfficientViT, attention_bias_idxs

__all__ = ['EfficientViT', 'attention_bias_idxs']
