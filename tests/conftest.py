"""Shared fixtures: a briefly trained tiny checkpoint that real servers can load."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.support import DenyDeletes, free_port, train_tiny

from llm.training.trainer import Trainer


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    logging.getLogger("llm").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return run_dir, train_tiny(run_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: tuple[Path, Trainer]) -> str:
    """A run directory holding committed checkpoints of a briefly trained `tiny` model."""
    return str(tiny_run[0])


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A bucket on a real S3-API server (moto) on 127.0.0.1, with the env a Kubernetes
    secret would provide (inherited by subprocesses the test starts)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # env only; never region_name
    try:
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True
        )
        # moto keeps its buckets per process, shared by every server it runs: a fresh name
        # per test keeps tests independent.
        bucket = f"ckpts-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()


@pytest.fixture
def deny_deletes(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The bucket again, reached through a proxy that refuses deletes (AWS_ENDPOINT_URL)."""
    proxy = DenyDeletes(os.environ["AWS_ENDPOINT_URL"].removeprefix("http://"))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    yield s3_bucket
    proxy.shutdown()


@pytest.fixture(scope="session")
def span_exporter() -> object:
    """An in-memory OpenTelemetry exporter behind this process's global tracer provider
    (which can be set only once per process: every tracing test shares this one)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """A tiny model decodes faster on one thread than fighting for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
