"""One trainer per run dir: the run lease, between real processes on a real S3 API."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.support import train_tiny

from llm import storage
from llm.training.lease import LEASE, RunLease, RunLeaseError

HOLD = """
import sys, time
from llm.training.lease import RunLease
RunLease(sys.argv[1], job_id="job-a", stale_after_s=float(sys.argv[2]), settle_s=0.1).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_is_refused_until_the_first_dies(s3_bucket: str) -> None:
    run = storage.join(s3_bucket, "run")
    stale_after = 2.0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, run, str(stale_after)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(stale_after * 1.5)  # longer than the timeout: only its heartbeat keeps it
        second = RunLease(run, job_id="job-b", stale_after_s=stale_after, settle_s=0.1)
        with pytest.raises(RunLeaseError) as refused:
            second.acquire()
        message = str(refused.value)
        assert (
            f"{run} is being trained by job 'job-a'" in message and f"pid {holder.pid}" in message
        )
    finally:
        holder.kill()
        holder.wait()
    # Its last heartbeat looks fresh, but it never moves again: taken over after a timeout.
    started = time.monotonic()
    second.acquire()
    assert time.monotonic() - started >= stale_after * 0.5
    assert b"job-b" in storage.read_bytes(storage.join(run, LEASE))
    second.release()
    assert not storage.exists(storage.join(run, LEASE))


def test_two_trainers_starting_at_once_one_wins(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    leases = [RunLease(run, job_id=f"job-{i}", settle_s=0.5) for i in range(2)]
    start, outcomes = threading.Barrier(2), {}

    def race(lease: RunLease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcomes[lease.job] = "held"
        except RunLeaseError as e:
            outcomes[lease.job] = str(e)

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o == "held" for o in outcomes.values()) == [False, True], outcomes
    for lease in leases:
        if outcomes[lease.job] == "held":
            lease.release()


def test_a_restart_of_the_same_job_takes_its_lease_over_at_once(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    RunLease(run, job_id="job-a", settle_s=0).acquire()  # its process "died" holding it
    restarted = RunLease(run, job_id="job-a", settle_s=0)
    restarted.acquire()
    restarted.check()
    restarted.release()


def test_a_holder_that_stalled_past_the_timeout_knows_it_lost(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    first = RunLease(run, job_id="job-a", stale_after_s=0.4, settle_s=0)
    first.acquire()
    # job-b judges it stale at once (as if job-a had stalled past the timeout) and takes over.
    second = RunLease(run, job_id="job-b", stale_after_s=1e-9, settle_s=0)
    second.acquire()
    deadline = time.monotonic() + 5
    while first.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunLeaseError, match=r"lost the run's lease \(taken over by job 'job-b'\)"):
        first.check()
    first.release()
    assert b"job-b" in storage.read_bytes(storage.join(run, LEASE))  # not ours to delete
    second.release()


def test_the_trainer_refuses_a_run_dir_another_job_trains(tmp_path: Path) -> None:
    run = tmp_path / "run"
    other = RunLease(str(run), job_id="someone-else", stale_after_s=0.4, settle_s=0)
    other.acquire()
    try:
        with pytest.raises(RunLeaseError, match=rf"{run} is being trained by job 'someone-else'"):
            train_tiny(run, max_steps=2, checkpoint={"lease_timeout_s": 5})
        assert not (run / "checkpoints").exists()
    finally:
        other.release()
