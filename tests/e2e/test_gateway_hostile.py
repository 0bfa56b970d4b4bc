"""Hostile input against real engine + gateway processes (API keys on): hundreds of
malformed requests, generated here, each get a 4xx OpenAI-shaped error, never a 5xx or a
stack trace; afterwards a valid request is served exactly as before."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.e2e.e2e_services import Service, running_stack

KEY = "sk-hostile-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json", **AUTH}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MB = 1 << 20
SLOW_S = 2.0  # the gateway's header and body read deadlines here

# Values of the wrong type (or shape) for every field, per endpoint.
COMMON_WRONG: dict[str, list[object]] = {
    "model": [None, 1, 1.5, True, [], {}, ["m"], ""],
    "temperature": ["hot", "0.5", True, [], {}, [0.5]],
    "top_p": ["1", False, [], {}, "nan"],
    "n": ["1", 1.5, True, [], {}],
    "stream": ["yes", "true", 1, 0, [], {}],
    "stream_options": ["x", 1, [], {"include_usage": "yes"}],
    "stop": [1, [1], [None], {}, True, [[]], ["a"] * 5, [""], ""],
    "seed": ["1", 1.5, True, [], {}],
    "presence_penalty": ["x", True, [], {}],
    "frequency_penalty": ["x", [], {}],
    "logit_bias": ["x", [1], {"1": "x"}, {"1": [1]}],
    "user": [1, [], {}, True],
    "max_tokens": ["2", 2.5, True, [], {}],
    # vLLM's sampling extras (the OpenAI SDK's extra_body).
    "top_k": ["1", 1.5, True, []],
    "min_p": ["x", True, {}],
    "repetition_penalty": ["x", [], True],
}
ENDPOINT_WRONG: dict[str, dict[str, list[object]]] = {
    COMPLETIONS: {
        "prompt": [None, 1, 1.5, True, {}, [1.5], [None], [{"a": 1}], [[1, "a"]], [True], ["a", 1]],
        "echo": ["yes", 1, [], {}],
        "logprobs": ["1", 1.5, True, [], {}],
        "best_of": ["2", [], {}],
        "suffix": [1, [], {}, " and more"],
    },
    CHAT: {
        "messages": [
            None,
            "hi",
            {},
            [],
            [1],
            ["hi"],
            [{}],
            [{"role": 1, "content": "x"}],
            [{"role": "wizard", "content": "x"}],
            [{"role": "user", "content": 1}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            [{"role": "user", "content": {"text": "x"}}],
        ],
        "logprobs": ["yes", 1, [], {}],
        "top_logprobs": ["1", 1.5, [], {}],
        "max_completion_tokens": ["2", 2.5, [], {}],
        "tools": ["x", {}, [1], [{"type": "function"}], [{"type": "x", "function": {"name": "f"}}]],
        "tool_choice": [
            "x",
            1,
            {"type": "function"},
            "required",
            {"type": "function", "function": {"name": "f"}},
        ],
        "response_format": [
            "json",
            {"type": 1},
            {},
            [],
            {"type": "xml"},
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"schema": {}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}},
        ],
    },
}
HUGE: dict[str, list[object]] = {
    "max_tokens": [1 << 31, 1 << 63, 10**30, 1e308],
    "n": [17, 10**9, 1 << 64],  # at most 16 choices per prompt
    "top_k": [1 << 31],
    "min_p": [1.5],
    "repetition_penalty": [1e300],
    "seed": [1 << 64, -(1 << 63) - 1, 10**100],
    "temperature": [1e308, 2.0001],
    "top_p": [1e10],
    "presence_penalty": [1e300],
    "frequency_penalty": [2.5],
}
NEGATIVE: dict[str, list[object]] = {
    "max_tokens": [-1, 0, -(1 << 40)],
    "temperature": [-0.1, -1e308],
    "top_p": [-1, 0],
    "n": [0, -1],
    "top_k": [-2],
    "min_p": [-0.1],
    "repetition_penalty": [0, -1],
    "presence_penalty": [-2.5],
    "frequency_penalty": [-100],
}
ENDPOINT_NUMBERS: dict[str, dict[str, list[object]]] = {
    COMPLETIONS: {
        "prompt": [
            [1 << 31],
            [10**20],
            [-1],
            [[-5]],
            [1 << 40],
            [10**6],  # not in the vocabulary
            ["a"] * 257,  # more than 256 choices
            [[], [1]],  # an empty prompt among others
            [""],
        ],
        "logprobs": [10**6, -1],
        "best_of": [-1, 0],
    },
    CHAT: {"top_logprobs": [10**6, -1], "max_completion_tokens": [-5, 0, 1 << 31]},
}


def base(path: str, model: str) -> dict[str, object]:
    if path == COMPLETIONS:
        return {"model": model, "prompt": "The ", "max_tokens": 2}
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def hostile_requests(model: str) -> Iterator[tuple[str, str, str, dict[str, str], bytes]]:
    """(label, method, path, headers, body) of malformed requests."""
    for path in (COMPLETIONS, CHAT):
        good = base(path, model)
        good_bytes = json.dumps(good).encode()
        # Invalid JSON.
        for raw in [b"", b"{", b"}", b"{not json}", b"{'model': 'x'}", b'{"model": ', b"[1, 2]",
                    b'"text"', b"42", b"null", b"true", b'{"model": "m",}', b"\x00\x01\x02",
                    bytes(range(256)), good_bytes + b" trailing", b'{"a": 1}{"b": 2}',
                    b'{"model": "m", "prompt": "\\x41"}', b'{"model": "m", "prompt": "\\u12"}',
                    b'{"model": NaN}', b"{" + b'"k": 1,' * 10_000 + b"}"]:  # fmt: skip
            yield f"json {raw[:20]!r}", "POST", path, JSON, raw
        for k in range(1, len(good_bytes) - 1):
            yield f"truncated at {k}", "POST", path, JSON, good_bytes[:k]
        # Wrong types, huge and negative numbers, field by field.
        tables = [COMMON_WRONG, ENDPOINT_WRONG[path], HUGE, NEGATIVE, ENDPOINT_NUMBERS[path]]
        for table in tables:
            for field, values in table.items():
                for value in values:
                    body = json.dumps({**good, field: value}).encode()
                    yield f"{field}={value!r:.40}", "POST", path, JSON, body
        # Missing required fields.
        for field in ("model", "prompt" if path == COMPLETIONS else "messages"):
            body = json.dumps({k: v for k, v in good.items() if k != field}).encode()
            yield f"no {field}", "POST", path, JSON, body
        yield "empty object", "POST", path, JSON, b"{}"
        # Numbers Python's JSON reads as inf, or with more digits than int() converts.
        for literal in (b"1e999", b"-1e999", b"1" + b"0" * 5000, b"NaN", b"Infinity"):
            for field in (b"max_tokens", b"temperature", b"seed"):
                body = good_bytes[:-1] + b', "' + field + b'": ' + literal + b"}"
                yield f"{field.decode()}={literal[:10]!r}", "POST", path, JSON, body
        # Deep nesting: past the JSON parser's recursion limit, and within it.
        input_field = "prompt" if path == COMPLETIONS else "messages"
        for depth in (50, 500, 5_000, 100_000):
            head = json.dumps({k: v for k, v in good.items() if k != input_field})[:-1]
            yield f"{input_field} depth {depth}", "POST", path, JSON, f'{head}, "{input_field}": {nested(depth)}}}'.encode()  # fmt: skip
            yield f"object depth {depth}", "POST", path, JSON, ('{"a":' * depth + "1" + "}" * depth).encode()  # fmt: skip
            yield f"logit_bias depth {depth}", "POST", path, JSON, f'{json.dumps(good)[:-1]}, "logit_bias": {{"1": {nested(depth)}}}}}'.encode()  # fmt: skip
        # Invalid UTF-8 and unencodable text.
        for bad in (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"abc\x80", b"\xf8\x88\x80\x80\x80"):
            body = good_bytes.replace(b'"hi"' if path == CHAT else b'"The "', b'"' + bad + b'"')
            yield f"utf-8 {bad!r}", "POST", path, JSON, body
        for field in ("model", "stop", "user", input_field):
            value = "a\ud800b" if field != "messages" else [{"role": "user", "content": "\udfff"}]
            body = json.dumps({**good, field: value}).encode()  # escapes: "\ud800" in the JSON
            yield f"surrogate in {field}", "POST", path, JSON, body
        # 10 MB bodies (and one just over the 4 MiB default limit).
        for size in (10 * MB, 5 * MB):
            yield f"{size} B prompt", "POST", path, JSON, json.dumps({**good, input_field: "x" * size}).encode()  # fmt: skip
        yield "10 MB garbage", "POST", path, JSON, b"\x00" * (10 * MB)
        yield "10 MB array", "POST", path, JSON, b"[" + b"1," * (5 * MB) + b"1]"
        # Longer than the model's context, and ids outside its vocabulary: refused by the engine.
        long_input: object = "x " * 2000 if path == COMPLETIONS else [{"role": "user", "content": "x " * 2000}]  # fmt: skip
        yield "over the context", "POST", path, JSON, json.dumps({**good, input_field: long_input}).encode()  # fmt: skip
        # Missing or wrong authentication.
        for auth in (None, "", "Bearer", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
                     f"Basic {KEY}", KEY, f"Bearer {KEY.upper()}", "Bearer " + "k" * 10_000):  # fmt: skip
            headers = {"content-type": "application/json"}
            if auth is not None:
                headers["Authorization"] = auth
            yield f"auth {auth!r:.30}", "POST", path, headers, good_bytes
        # Wrong content type, method, path.
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            yield f"content-type {ctype}", "POST", path, {**AUTH, "content-type": ctype}, good_bytes
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            yield f"{method} {path}", method, path, JSON, good_bytes
        yield "unknown path", "POST", path + "/extra", JSON, good_bytes
    for auth in (None, "Bearer nope"):
        headers = {"Authorization": auth} if auth else {}
        yield f"models auth {auth}", "GET", "/v1/models", headers, b""
    yield "unknown model", "GET", "/v1/models/gpt-nope", AUTH, b""
    yield (
        "unknown model in request",
        "POST",
        CHAT,
        JSON,
        json.dumps(base(CHAT, "gpt-nope")).encode(),
    )


@pytest.fixture(scope="module")
def keyed_stack(
    tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    logs = tmp_path_factory.mktemp("hostile")
    keys = Path(logs / "api-keys")
    keys.write_text(KEY + "\n")
    gateway_args = ["--api-keys-file", str(keys), "--header-timeout-s", str(SLOW_S),
                    "--body-timeout-s", str(SLOW_S)]  # fmt: skip
    with running_stack(tiny_checkpoint, logs, (), gateway_args) as services:
        yield services


def test_malformed_requests_get_openai_4xx_errors(keyed_stack: tuple[Service, Service]) -> None:
    gateway = keyed_stack[1]
    # TCP_NODELAY: httpx writes headers and body separately, and Nagle's algorithm would
    # hold the body for the server's delayed ACK (40 ms a request).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    base_url = f"http://127.0.0.1:{gateway.port}"
    with httpx.Client(base_url=base_url, timeout=30, transport=transport) as client:
        model = client.get("/v1/models", headers=AUTH).json()["data"][0]["id"]
        valid = {"model": model, "prompt": "The ", "max_tokens": 8, "temperature": 0}
        before = client.post(COMPLETIONS, json=valid, headers=AUTH)
        assert before.status_code == 200, before.text

        statuses: dict[int, int] = {}
        failures = []
        sent = 0
        for label, method, path, headers, body in hostile_requests(model):
            sent += 1
            response = client.request(method, path, content=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            try:
                error = response.json()["error"]
                shaped = set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)  # fmt: skip
            except (ValueError, KeyError, TypeError):
                shaped = False
            if not (400 <= response.status_code < 500 and shaped) or "Traceback" in response.text:
                failures.append((label, path, response.status_code, response.text[:200]))
        assert sent >= 500, sent
        assert not failures, f"{len(failures)} of {sent} not a 4xx OpenAI error:\n" + "\n".join(map(str, failures[:30]))  # fmt: skip
        assert {400, 401, 404, 405, 413} <= statuses.keys(), statuses

        after = client.post(COMPLETIONS, json=valid, headers=AUTH)
        assert after.status_code == 200, after.text
        assert after.json()["choices"] == before.json()["choices"]
        assert after.json()["usage"] == before.json()["usage"]
        assert after.json()["usage"]["completion_tokens"] == 8
    errors = [r for r in gateway.logs() if r.get("level") in ("ERROR", "CRITICAL")]
    assert not errors, errors[:3]
    assert KEY not in gateway.log.read_text()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_request_near_the_body_limit_breaks_nothing(keyed_stack: tuple[Service, Service]) -> None:
    """Bodies just under the 4 MiB limit (a text prompt, messages, a token array; n=16) are refused
    with a 400 naming the prompt while two streams run on the same engine stream: both
    finish whole, and the big token array costs the gateway little memory (it is checked
    against the context before any engine request is built)."""
    from concurrent.futures import ThreadPoolExecutor

    gateway = keyed_stack[1]
    base_url = f"http://127.0.0.1:{gateway.port}"
    with httpx.Client(base_url=base_url, timeout=60, headers=AUTH) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        started = [0, 0]

        def stream(i: int) -> list[dict]:
            body = {"model": model, "prompt": "The ", "max_tokens": 120, "temperature": 0,
                    "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            chunks = []
            with client.stream("POST", COMPLETIONS, json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        started[i] = 1
            return chunks

        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(stream, i) for i in range(2)]
            while sum(started) < 2 and not any(f.done() for f in running):
                pass
            before = _rss(gateway.proc.pid)
            big = "ab " * ((4 * MB - 4096) // 3)
            text = {"model": model, "prompt": big, "max_tokens": 4, "n": 16}
            body = json.dumps(text).encode()
            assert 4 * MB - 8192 < len(body) < 4 * MB
            refused = client.post(COMPLETIONS, content=body, headers=JSON)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
            messages = {"model": model, "messages": [{"role": "user", "content": big}], "n": 16}
            refused = client.post(CHAT, content=json.dumps(messages).encode(), headers=JSON)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"

            ids = {"model": model, "prompt": [7] * ((4 * MB - 4096) // 2), "n": 16}
            body = json.dumps(ids, separators=(",", ":")).encode()
            assert 4 * MB - 8192 < len(body) < 4 * MB
            refused = client.post(COMPLETIONS, content=body, headers=JSON)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
            assert "context length" in refused.json()["error"]["message"]
            grown = _rss(gateway.proc.pid) - before
            assert grown < 50 * MB, f"the gateway grew {grown / MB:.0f} MiB"
            results = [f.result() for f in running]
    for chunks in results:
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 120  # every token, none lost


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes `sock` (reads until EOF); fails after `seconds`."""
    import time

    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_slow_clients_do_not_hold_connections(keyed_stack: tuple[Service, Service]) -> None:
    """An idle connection, half-sent headers and a half-sent body are each closed once the
    gateway's read deadline passes, and the gateway keeps serving."""
    gateway = keyed_stack[1]
    address = ("127.0.0.1", gateway.port)
    head = f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    partials = [
        b"",  # connected, nothing sent
        head.encode(),  # headers never finished
        (head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
        + b'{"model": ',  # a tenth of the body
    ]
    socks = [socket.create_connection(address) for _ in partials]
    for sock, data in zip(socks, partials, strict=True):
        sock.sendall(data)
    for sock in socks:
        assert _closed_within(sock, SLOW_S + 8) <= SLOW_S + 8
        sock.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as client:
        model = client.get("/v1/models", headers=AUTH).json()["data"][0]["id"]
        body = {"model": model, "prompt": "The ", "max_tokens": 4}
        assert client.post(COMPLETIONS, json=body, headers=AUTH).status_code == 200
