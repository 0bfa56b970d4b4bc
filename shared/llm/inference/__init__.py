"""Inference: sampling, KV-cached generation and incremental detokenization.

The engine's scheduler builds on these; nothing here knows about gRPC or HTTP.
"""

from llm.inference.detokenize import IncrementalDecoder
from llm.inference.generate import generate, max_new_tokens_for, stream_generate
from llm.inference.sampling import (
    SamplingParams,
    filter_logits,
    make_generator,
    sample,
    token_logprobs,
)

__all__ = [
    "IncrementalDecoder",
    "SamplingParams",
    "filter_logits",
    "generate",
    "make_generator",
    "max_new_tokens_for",
    "sample",
    "stream_generate",
    "token_logprobs",
]
