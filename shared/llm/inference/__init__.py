"""Inference: batched sampling, continuous batching over KV-cache slots (a step scheduler,
a model runner, prefix caching), generation and incremental detokenization.

The engine's scheduler builds on these; nothing here knows about gRPC or HTTP.
"""

from llm.inference.batching import BatchGenerator, TokenEvent
from llm.inference.detokenize import IncrementalDecoder
from llm.inference.generate import generate, max_new_tokens_for, stream_generate
from llm.inference.sampling import Sampler, SamplingParams, token_logprobs
from llm.inference.scheduler import Request

__all__ = [
    "BatchGenerator",
    "IncrementalDecoder",
    "Request",
    "Sampler",
    "SamplingParams",
    "TokenEvent",
    "generate",
    "max_new_tokens_for",
    "stream_generate",
    "token_logprobs",
]
