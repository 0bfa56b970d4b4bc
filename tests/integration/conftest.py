"""Fixtures for the integration tests: the gateway's engine double."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.integration.engine_double import FakeServer


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    """An engine double (engine_double.py) shared by a module's tests."""
    server = FakeServer("a")
    yield server
    server.stop()
