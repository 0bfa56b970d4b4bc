"""Leaf modules of the model library; importing this registers every component."""

from llm.core import attn, mlp, moe, norm  # noqa: F401  (registration side effects)
from llm.core.registry import ATTENTION_REGISTRY, MLP_REGISTRY, NORM_REGISTRY

__all__ = ["ATTENTION_REGISTRY", "MLP_REGISTRY", "NORM_REGISTRY"]
