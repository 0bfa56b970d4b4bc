"""Attention variants, registered in ATTENTION_REGISTRY."""

from llm.core.attn.mha import Attention

__all__ = ["Attention"]
