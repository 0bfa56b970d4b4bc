"""Fixtures for the end-to-end tests: an engine process and a gateway process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_services import Service, running_stack


@pytest.fixture(scope="module")
def stack(
    tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    """An engine process and a gateway process in front of it."""
    with running_stack(tiny_checkpoint, tmp_path_factory.mktemp("stack")) as services:
        yield services
