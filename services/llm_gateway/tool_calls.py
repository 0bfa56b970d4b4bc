"""Tool calls parsed out of a chat answer, for the template families we serve: Hermes/Qwen
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (what the engine's grammar
writes under `tool_choice: "required"` or a named function)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The answer's content (None when it is only calls) and its calls, in OpenAI's shape
    (`{id, type: "function", function: {name, arguments}}`, arguments as JSON text). A
    block that is not a call (not JSON, no name) stays in the content."""
    calls, kept = [], []
    end = 0
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            continue
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments},
        })  # fmt: skip
        kept.append(text[end : match.start()])
        end = match.end()
    if not calls:
        return text, []
    content = ("".join(kept) + text[end:]).strip()
    return content or None, calls
