"""Attention variants, registered in ATTENTION_REGISTRY."""

from llm.core.attn.mha import Attention
from llm.core.attn.mla import MultiHeadLatentAttention

__all__ = ["Attention", "MultiHeadLatentAttention"]
