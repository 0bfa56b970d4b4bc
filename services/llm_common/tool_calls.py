"""Tool calls parsed out of a chat answer, incrementally, in the format of the model's chat
template:

- `hermes` (Hermes, Qwen): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  (what the engine's grammar writes under `tool_choice: "required"` or a named function);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (tokenizers before v11:
  Mistral 7B v0.3, Mixtral);
- `mistral_v11` (tokenizer v11 on: Mistral Small 3.2, Magistral, Devstral): each call is
  `[TOOL_CALLS]` then the function's name, `[ARGS]` and the arguments' JSON object
  (`[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]...`); a `[CALL_ID]id` before `[ARGS]` is
  skipped, and a missing `[ARGS]` tolerated (the name ends at the `{`), as vLLM's parser does;
- `llama3` (Llama 3.1+ JSON tool calling): an answer that is `{"name": ..., "parameters":
  {...}}` objects (separated by `;`), optionally after `<|python_tag|>`.

The Mistral and Llama markers are special tokens. The engine keeps them in the text of a
chat with tools; an engine that drops them (one from before) still has its `mistral` and
`llama3` calls read: an answer that opens with `[` (mistral) or `{` (llama3) is read as
calls too, and is content again if it turns out not to be.

Both sides of the engine API parse with this one parser: the engine fills a chat with
tools' last `GenerateChunk` with its calls (`tool_calls`, `content`), and the gateway
streams them as OpenAI deltas (it may send a chat to the engine as token ids, which carry
no tools). Pure text parsing: no torch, so the gateway imports it too.

`Parser.feed` takes the text as it is generated and returns what can be sent already:
content (only text that could start a call marker, and whitespace, is held back), each
call's name as soon as it is read, then its arguments piece by piece as the JSON arrives,
as OpenAI streams them. `parse` is the same parser over a whole answer, so a stream's
deltas add up to the whole answer's message."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

# The engine's `ModelInfo.tool_call_format` values.
FORMATS = ("hermes", "mistral", "mistral_v11", "llama3")


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class Arguments:
    index: int
    text: str  # a piece of the call's arguments (JSON text)


Event = Content | CallStart | Arguments

_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')  # fmt: skip
# Per format: the marker that opens the calls, the separators between call objects, and
# what closes the calls (back to content; None: the calls run to the end of the answer).
# A `mistral_v11` block is one call: the name, then its arguments object (`_named_call`).
_START = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "mistral_v11": "[TOOL_CALLS]",
          "llama3": "<|python_tag|>"}  # fmt: skip
_SEPARATORS = {"hermes": " \t\r\n", "mistral": " \t\r\n[,", "llama3": " \t\r\n;"}
_END = {"hermes": "</tool_call>", "mistral": "]", "mistral_v11": None, "llama3": None}
# An answer that opens with this is calls even without the marker: the marker is a special
# token in Llama 3 and Mistral vocabularies, which the engine's decoding drops.
_OPENS = {"mistral": "[", "llama3": "{"}
# A `mistral_v11` call's header, between `[TOOL_CALLS]` and its arguments' `{`: what may
# appear in it (a longer one, or another character, is not a call), and its shape.
_NAMED_HEADER_CHARS = re.compile(r"[\w.\-\[\] \t\r\n]")
_NAMED_HEADER = re.compile(r"\s*([\w.\-]+)\s*(?:\[CALL_ID\][\w\-]*)?\s*(?:\[ARGS\])?\s*")
_MAX_NAMED_HEADER = 256


class _Object:
    """One JSON object read character by character: its depth and strings tracked, its call
    header (name) matched as soon as it is there, its arguments value delimited."""

    def __init__(self, name: str | None = None) -> None:
        """`name`: the object is the arguments of a call of that name (`mistral_v11`), not
        a call object with a name and arguments inside."""
        self.text, self.depth, self.in_string, self.escaped = "", 0, False, False
        self.name = name
        self.args_at = 0 if name is not None else -1  # the arguments value's span in `text`
        self.args_end = -1
        self.args_depth = -1 if name is not None else 1  # where the arguments value closes
        self.sent = 0  # how far into the arguments value has been sent
        self.announced = False  # its CallStart went out

    def add(self, ch: str) -> bool:
        """Take one character; True when the object is complete."""
        self.text += ch
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.args_at >= 0 and self.args_end < 0 and self.depth == self.args_depth:
                self.args_end = len(self.text)
        if self.name is None and self.args_at < 0 and self.text[-1:] not in " \t\r\n:":
            m = _HEADER.match(self.text)
            if m and m.end() == len(self.text) - 1 and self.text[-1] in "{[":
                self.name = json.loads(f'"{m.group(1)}"')
                self.args_at = m.end()
        return self.depth == 0

    def pending_arguments(self) -> str:
        """Arguments text read since the last call (once the name is known)."""
        if self.args_at < 0:
            return ""
        end = self.args_end if self.args_end >= 0 else len(self.text)
        piece, self.sent = self.text[max(self.sent, self.args_at) : end], end
        return piece


class Parser:
    """Incremental tool call parser for one answer in `fmt` (one of `FORMATS`)."""

    def __init__(self, fmt: str = "hermes") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool call format {fmt!r}")
        self.fmt, self.start, self.end = fmt, _START[fmt], _END[fmt]
        self.buf = ""  # text not yet handled
        self.held = ""  # whitespace held back until content follows it
        self.in_calls = False
        self.block = ""  # raw text of the current calls block (content again if no call)
        self.block_calls = 0
        self.obj: _Object | None = None
        self.calls = 0
        self.at_start = True  # an answer that opens with `_OPENS[fmt]` is calls
        self.marker = ""  # what opened the current calls block
        self.after_call = False  # whitespace right after a call is dropped

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while self.buf:
            if not (self._calls(events) if self.in_calls else self._content(events)):
                break
        return events

    def finish(self) -> list[Event]:
        """The end of the answer: what was held back."""
        events = self.feed("")
        if self.in_calls and self.obj is not None and self.obj.name is not None:
            self._emit_arguments(events)  # cut short: the call as far as it went
        elif self.in_calls and self.block_calls == 0:
            self._text(events, self.marker + self.block + self.buf)
        elif not self.in_calls:
            self._text(events, self.buf)
        if self.held and not self.calls:  # trailing whitespace stays only in a plain answer
            events.append(Content(self.held))
        self.buf = self.held = ""
        return [e for e in events if not (isinstance(e, Content) and not e.text)]

    # -- content --------------------------------------------------------------------

    def _content(self, events: list[Event]) -> bool:
        if self.fmt in _OPENS and self.at_start:
            stripped = self.buf.lstrip()
            if len(stripped) < len(self.start) and self.start.startswith(stripped):
                return False  # nothing yet, or maybe the marker
            self.at_start = False
            if stripped[0] == _OPENS[self.fmt] and not stripped.startswith(self.start):
                # the leading whitespace goes back with the block if it is not calls
                self._open_calls(self.buf[: len(self.buf) - len(stripped)])
                self.buf = stripped
                return True
        i = self.buf.find(self.start)
        if i >= 0:
            self._text(events, self.buf[:i])
            self.buf = self.buf[i + len(self.start) :]
            self._open_calls(self.start)
            return True
        keep = _partial_suffix(self.buf, self.start)
        self._text(events, self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _text(self, events: list[Event], text: str) -> None:
        """Content, with whitespace held back until non-whitespace follows it."""
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        if not text:
            return
        body = text.rstrip()
        if body:
            events.append(Content(self.held + body))
            self.held = ""
        self.held += text[len(body) :]

    def _open_calls(self, marker: str) -> None:
        self.in_calls, self.block, self.block_calls, self.obj = True, "", 0, None
        self.marker = marker

    # -- calls ----------------------------------------------------------------------

    def _calls(self, events: list[Event]) -> bool:
        if self.obj is None and self.fmt == "mistral_v11":
            return self._named_call(events)
        if self.obj is None:
            if self.end is not None and self.buf.startswith(self.end):
                self._close_calls(events, len(self.end))
                return True
            if self.end is not None and self.end.startswith(self.buf):
                return False  # maybe the end marker
            ch = self.buf[0]
            if ch in _SEPARATORS[self.fmt]:
                self.block += ch
                self.buf = self.buf[1:]
                return True
            if ch != "{":  # not a call: the block is content again
                self._close_calls(events, 0)
                return True
            self.obj = _Object()
        return self._read_object(events)

    def _named_call(self, events: list[Event]) -> bool:
        """A `mistral_v11` call: its header (the name up to the arguments' `{`), then its
        arguments as they arrive; the block is content if the header cannot be one."""
        i = 0
        while i < len(self.buf) and self.buf[i] != "{" and _NAMED_HEADER_CHARS.match(self.buf[i]):
            i += 1
        self.block += self.buf[:i]
        self.buf = self.buf[i:]
        short = len(self.block) <= _MAX_NAMED_HEADER
        if not self.buf and short:
            return False  # more of the header to come
        header = _NAMED_HEADER.fullmatch(self.block) if short and self.buf[0] == "{" else None
        if header is None:
            self._close_calls(events, 0)
            return True
        self.obj = _Object(header.group(1))
        return self._read_object(events)

    def _read_object(self, events: list[Event]) -> bool:
        assert self.obj is not None
        i, done = 0, False
        while i < len(self.buf) and not done:
            done = self.obj.add(self.buf[i])
            i += 1
        self.block += self.buf[:i]
        self.buf = self.buf[i:]
        obj = self.obj
        if obj.name is not None and not obj.announced:
            obj.announced = True
            self.held = ""  # whitespace before a call is dropped
            events.append(CallStart(self.calls, f"call_{uuid.uuid4().hex[:24]}", obj.name))
            self.calls += 1
            self.block_calls += 1
        if obj.name is not None:
            self._emit_arguments(events)
        if done:
            self.obj = None
            if obj.name is None:
                self._whole_object(events, obj.text)
            elif self.fmt == "mistral_v11":  # one call per `[TOOL_CALLS]`
                self._close_calls(events, 0)
        return done or bool(self.buf)

    def _emit_arguments(self, events: list[Event]) -> None:
        assert self.obj is not None
        piece = self.obj.pending_arguments()
        if piece:
            events.append(Arguments(self.calls - 1, piece))

    def _whole_object(self, events: list[Event], text: str) -> None:
        """An object whose header did not stream (keys in another order, string arguments)."""
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        self.held = ""
        events.append(CallStart(self.calls, f"call_{uuid.uuid4().hex[:24]}", call["name"]))
        events.append(Arguments(self.calls, arguments))
        self.calls += 1
        self.block_calls += 1

    def _close_calls(self, events: list[Event], end: int) -> None:
        self.buf = self.buf[end:]
        if self.block_calls == 0:  # no call in it: the block was content
            self._text(events, self.marker + self.block + (self.end or "")[:end])
        self.in_calls, self.obj = False, None
        self.after_call = self.after_call or self.block_calls > 0


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse(text: str, fmt: str = "hermes") -> tuple[str | None, list[dict[str, Any]]]:
    """The answer's content (None when it is only calls) and its calls, in OpenAI's shape
    (`{id, type: "function", function: {name, arguments}}`, arguments as JSON text). A
    block that is not a call (not JSON, no name) stays in the content."""
    parser = Parser(fmt)
    return accumulate(parser.feed(text) + parser.finish())


def accumulate(events: list[Event]) -> tuple[str | None, list[dict[str, Any]]]:
    """Events added up: the content and the calls, as a client adds up stream deltas."""
    content, calls = "", []
    for e in events:
        if isinstance(e, Content):
            content += e.text
        elif isinstance(e, CallStart):
            calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})  # fmt: skip
        else:
            calls[e.index]["function"]["arguments"] += e.text
    if not calls:
        return content, []
    return content or None, calls
