"""The trainer survives crashes: real torchrun workers, a real S3 API, real SIGKILLs.

- A worker killed mid-run: torchrun restarts the group, which resumes from the newest
  committed checkpoint in S3 and ends with weights bitwise equal to an uninterrupted run
  (CPU, fp32, gloo: every op is deterministic, so equality is exact).
- The whole job killed while a checkpoint is being written (its manifest upload held by a
  proxy in front of S3): the partial checkpoint is ignored, the restart resumes from the
  previous one and still ends bitwise equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from tests.support import S3Proxy, free_port

from llm import storage
from llm.checkpoint import checkpoint_dir, is_committed, latest_checkpoint, load_checkpoint
from llm.data.corpus import default_corpus

pytestmark = pytest.mark.slow

MAX_STEPS = 120


def trainer_args(corpus: Path, run_dir: str) -> list[str]:
    return [
        "--data.source", str(corpus), "--model.preset", "tiny",
        "--training.max-steps", str(MAX_STEPS), "--training.batch-size", "4",
        "--training.block-size", "32", "--training.eval-interval", "60",
        "--training.eval-batches", "2", "--training.log-interval", "10",
        "--checkpoint.interval", "20", "--checkpoint.keep-last", "3",
        "--checkpoint.run-dir", run_dir,
        # A collective whose peer was killed fails fast instead of waiting the default 10 min.
        "--distributed.timeout-s", "60",
    ]  # fmt: skip


def torchrun(corpus: Path, run_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-conf=last_call_timeout=1", "--max-restarts=3", "--monitor-interval=0.5",
        "-m", "llm_trainer", *trainer_args(corpus, run_dir),
    ]  # fmt: skip


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(default_corpus()[:15]))
    return path


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    loaded = load_checkpoint(run_dir)
    assert loaded.uri.endswith(f"step-{MAX_STEPS:08d}")
    return loaded.model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def start_events(run_dir: str) -> list[int]:
    lines = storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["event"] == "start"]


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def worker_with_rank(agent_pid: int, rank: int) -> int | None:
    for pid in children(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def wait_for_checkpoint(
    run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = latest_checkpoint(run_dir)
        if latest is not None and int(latest.rsplit("-", 1)[1]) >= step:
            return
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint >= {step} in {run_dir}")


def test_killed_worker_restarts_and_resumes_exactly(
    s3_bucket: str, corpus: Path, tmp_path: Path
) -> None:
    reference = f"{s3_bucket}/reference"
    subprocess.run(torchrun(corpus, reference), check=True, capture_output=True, timeout=400)

    run = f"{s3_bucket}/killed"
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:  # a file, not a pipe: a full pipe would stall the workers
        proc = subprocess.Popen(
            torchrun(corpus, run), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for_checkpoint(run, 40, proc)
            victim = worker_with_rank(proc.pid, 1)
            assert victim is not None, "rank 1 worker not found"
            os.kill(victim, signal.SIGKILL)
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:  # take the workers down with the agent
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()[-3000:]
    starts = start_events(run)
    assert starts[0] == 0 and len(starts) >= 2 and starts[-1] >= 40, starts  # it resumed
    assert_same_weights(final_weights(run), final_weights(reference))


class _HoldManifest(S3Proxy):
    """Holds the upload of one checkpoint's manifest: the client never gets an answer (its
    process is gone by the time the proxy lets go)."""

    def __init__(self, upstream: str, hold: str) -> None:
        super().__init__(upstream)
        self.hold = hold
        self.holding, self.release = threading.Event(), threading.Event()

    def intercept(self, handler: BaseHTTPRequestHandler) -> bool:
        if handler.command != "PUT" or self.hold not in handler.path or self.release.is_set():
            return False
        self.holding.set()
        self.release.wait(120)
        handler.close_connection = True
        return True


def test_job_killed_while_writing_a_checkpoint_resumes_from_the_previous(
    s3_bucket: str, corpus: Path
) -> None:
    single = lambda run: [sys.executable, "-m", "llm_trainer", *trainer_args(corpus, run)]  # noqa: E731
    reference = f"{s3_bucket}/reference-1p"
    subprocess.run(single(reference), check=True, capture_output=True, timeout=400)

    run = f"{s3_bucket}/partial"
    upstream = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    proxy = _HoldManifest(upstream, hold="partial/checkpoints/step-00000040/manifest.json")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    # The restart is the same job (as a Kubernetes Job's retry is): it takes over the run's
    # lease at once instead of waiting for the killed process's heartbeat to go stale.
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
           "LLM_JOB_ID": "partial-job"}  # fmt: skip
    try:
        proc = subprocess.Popen(
            single(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proxy.holding.wait(240), "the step-40 manifest upload never started"
        proc.kill()  # the whole job dies with step 40's files written but not committed
        proc.wait(30)
    finally:
        proxy.release.set()
    partial = checkpoint_dir(run, 40)
    assert storage.exists(storage.join(partial, "model.safetensors"))
    assert not is_committed(partial)
    assert latest_checkpoint(run).endswith("step-00000020")

    subprocess.run(single(run), check=True, capture_output=True, timeout=400, env=env)
    proxy.shutdown()
    assert start_events(run)[-1] == 20  # the restart skipped the partial step 40
    assert_same_weights(final_weights(run), final_weights(reference))
