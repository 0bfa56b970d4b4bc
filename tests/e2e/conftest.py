"""Fixtures for the end-to-end tests: an engine process and a gateway process."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from tests.e2e.e2e_services import Service, running_stack

from llm.checkpoint import LoadedModel, load_checkpoint


@pytest.fixture(scope="module")
def stack(
    tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    """An engine process and a gateway process in front of it."""
    with running_stack(tiny_checkpoint, tmp_path_factory.mktemp("stack")) as services:
        yield services


@pytest.fixture(scope="module")
def gateway(stack: tuple[Service, Service]) -> Service:
    return stack[1]


@pytest.fixture(scope="module")
def client(gateway: Service) -> openai.OpenAI:
    # No retries: a 429/503 must surface, not be retried into a pass.
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="x", max_retries=0, timeout=30
    )


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: str) -> LoadedModel:
    """The same checkpoint in-process: what the services' answers must equal."""
    return load_checkpoint(tiny_checkpoint)
