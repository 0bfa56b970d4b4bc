"""Hooks for the schemathesis CLI run by test_gateway_schemathesis.py (SCHEMATHESIS_HOOKS).

Half of the generated bodies name the served model (`LLM_TEST_SERVED_MODEL`), so that
generated parameters reach the engine instead of stopping at a 404 for a random model.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import schemathesis

MODEL = os.environ.get("LLM_TEST_SERVED_MODEL", "")


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    named = isinstance(body, dict) and isinstance(body.get("model"), str)
    if named and MODEL and zlib.crc32(repr(body).encode()) % 2:
        body = {**body, "model": MODEL}
    return body


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx body is `{"error": {"message", "type", "param", "code"}}`."""
    if 400 <= response.status_code < 500:
        body = response.json()
        if set(body) != {"error"} or set(body["error"]) != {"message", "type", "param", "code"}:
            raise AssertionError(f"not an OpenAI error: {response.text[:200]}")
    return None
