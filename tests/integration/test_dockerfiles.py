"""Dockerfile.train and Dockerfile.serve, checked without a Docker engine.

Every command the images run must be a console script installed with the flags they
pass (parsed by the command's own parser), the final stages must be non-root and free of
build tools, the build context must keep what COPY needs, and the serve image's health
check must work as a real process against an HTTP and a gRPC health endpoint.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.train", "Dockerfile.serve"]
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "apt-get install", "cmake")


def instructions(path: Path) -> list[tuple[str, str, str]]:
    """(INSTRUCTION, arguments, heredoc body) with continuations joined, comments dropped."""
    out: list[tuple[str, str, str]] = []
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, args = line.strip().partition(" ")
        body = ""
        if "<<" in args:  # a heredoc: `COPY <<'EOF' /dest` ... `EOF`
            marker = args.split("<<", 1)[1].split()[0].strip("'\"")
            body = "\n".join(iter(lambda: next(lines), marker)) + "\n"
        out.append((keyword.upper(), args.strip(), body))
    return out


def final_stage(path: Path) -> list[tuple[str, str, str]]:
    steps = instructions(path)
    start = max(i for i, (k, _, _) in enumerate(steps) if k == "FROM")
    return steps[start:]


def exec_form(steps, keyword: str) -> list[str] | None:
    found = [json.loads(args) for k, args, _ in steps if k == keyword]
    return found[-1] if found else None


def console_script(name: str):
    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    return ep


def check_llm_command(argv: list[str]) -> None:
    """`argv[0]` is one of our console scripts and accepts the flags `argv[1:]`."""
    ep = console_script(argv[0])
    assert ep.dist.name == "llm", ep
    module = importlib.import_module(ep.module)
    assert ep.attr == "main"
    module.parse(argv[1:])  # argparse exits 2 on an unknown flag


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_small_and_non_root(name):
    steps = final_stage(ROOT / name)
    users = [args for k, args, _ in steps if k == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot checks it)"
    runs = " ".join(args for k, args, _ in steps if k == "RUN")
    assert not [tool for tool in BUILD_TOOLS if tool in runs]
    assert any(k == "COPY" and args.startswith("--from=build") for k, args, _ in steps)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_pin_matches_pyproject(name):
    pyproject = (ROOT / "pyproject.toml").read_text()
    text = (ROOT / name).read_text()
    pins = {word for word in text.split() if word.startswith("torch==")}
    assert pins and all(f'"{pin}"' in pyproject for pin in pins)


def test_train_entrypoint_is_torchrun_of_the_trainer():
    steps = final_stage(ROOT / "Dockerfile.train")
    argv = exec_form(steps, "ENTRYPOINT")
    assert console_script(argv[0]).dist.name == "torch"
    args = get_args_parser().parse_args(argv[1:])
    assert args.module and args.training_script == "llm_trainer"
    assert importlib.util.find_spec("llm_trainer.__main__") is not None


def test_serve_commands_are_console_scripts_with_their_flags():
    steps = final_stage(ROOT / "Dockerfile.serve")
    assert exec_form(steps, "ENTRYPOINT") is None  # so `docker run IMAGE llm-engine` works
    check_llm_command(exec_form(steps, "CMD"))
    # The two commands the chart runs, with the flags the header comment shows.
    check_llm_command(["llm-engine", "--checkpoint", "s3://b/runs/x", "--host", "0.0.0.0"])
    check_llm_command(["llm-gateway", "--engine", "engine:50051", "--host", "0.0.0.0"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_keeps_what_copy_needs(name):
    ignored = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert {".git", ".venv", "runs", "tests"} <= set(ignored)
    for k, args, _ in instructions(ROOT / name):
        if k != "COPY" or args.startswith(("--from", "<<")):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert not any(fnmatch.fnmatch(source, p) for p in ignored), source


@pytest.fixture(scope="module")
def healthcheck(tmp_path_factory) -> list[str]:
    steps = final_stage(ROOT / "Dockerfile.serve")
    (script,) = [body for k, args, body in steps if k == "COPY" and body]
    path = tmp_path_factory.mktemp("hc") / "healthcheck.py"
    path.write_text(script)
    argv = json.loads(next(a for k, a, _ in steps if k == "HEALTHCHECK").split("CMD", 1)[1])
    assert argv[:1] == ["python"] and argv[1].endswith("healthcheck.py")
    return [sys.executable, str(path)]


def run_check(argv: list[str], **env: str) -> int:
    env = {**os.environ, "LLM_GATEWAY_PORT": "1", "LLM_ENGINE_PORT": "1", **env}
    return subprocess.run(argv, env=env, timeout=30, capture_output=True).returncode


class Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_healthcheck_passes_for_the_gateway(healthcheck):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert run_check(healthcheck, LLM_GATEWAY_PORT=str(server.server_port)) == 0
    finally:
        server.shutdown()


def test_healthcheck_follows_the_engine_grpc_health(healthcheck):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # model still loading
        assert run_check(healthcheck, LLM_ENGINE_PORT=str(port)) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_check(healthcheck, LLM_ENGINE_PORT=str(port)) == 0
    finally:
        server.stop(0)


def test_healthcheck_fails_when_nothing_answers(healthcheck):
    assert run_check(healthcheck) == 1
