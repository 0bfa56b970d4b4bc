"""Shared fixtures: a briefly trained tiny checkpoint that real servers can load."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llm.data.corpus import default_corpus
from llm.data.dataset import TokenWindows, tokenize_documents
from llm.data.tokenizers import SimpleCharacterTokenizer
from llm.settings import load_settings
from llm.training.distributed import DistInfo
from llm.training.engine import TrainingEngine
from llm.training.lm_data import RandomWindowData
from llm.training.run import run_training

TINY_STEPS = 300
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_settings(run_dir: Path, max_steps: int = TINY_STEPS, **sections: dict[str, Any]) -> Any:
    """Settings for the `tiny` preset on Python's reference docs (seconds on 2 cores)."""
    base: dict[str, dict[str, Any]] = {
        "model": {"preset": "tiny"},
        "training": {"max_steps": max_steps, "batch_size": 16, "block_size": 64,
                     "eval_interval": 100, "eval_batches": 10, "log_interval": 100},
        "optimization": {"lr": 3e-3, "warmup_steps": 20},
        "checkpoint": {"run_dir": str(run_dir), "interval": 100},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(base)


def train_tiny(run_dir: Path, max_steps: int = TINY_STEPS, **sections: dict[str, Any]) -> TrainingEngine:
    settings = tiny_settings(run_dir, max_steps, **sections)
    docs = default_corpus()
    tok = SimpleCharacterTokenizer.train("".join(docs))
    t = settings.training
    windows = TokenWindows(tokenize_documents(docs, tok), t.block_size, settings.data.val_fraction)
    data = RandomWindowData(windows, t.batch_size, t.seed, eval_batches=t.eval_batches)
    return run_training(settings, tok, data, CPU)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingEngine]:
    logging.getLogger("llm").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return run_dir, train_tiny(run_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: tuple[Path, TrainingEngine]) -> str:
    """A run directory holding committed checkpoints of a briefly trained `tiny` model."""
    return str(tiny_run[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        fs.mkdir("ckpts")
        yield "s3://ckpts"
    finally:
        server.stop()
