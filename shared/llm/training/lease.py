"""One trainer per run directory: a lease object (`<run_dir>/lease.json`) with a heartbeat.

Two trainers on one run dir would write the same step dirs and delete each other's work
through retention. The first to start holds the lease: it writes its job id and the time,
and a thread rewrites the time every `stale_after_s / 4` seconds. Another job that finds a
lease refreshed less than `stale_after_s` ago watches it: once it sees the heartbeat
advance it refuses to start, naming the run dir and the holder; a lease older than that,
or one that stays still for `stale_after_s`, was left by a job that died and is taken
over. A restart of the same job (same job id: `LLM_JOB_ID`, else torchrun's run id, else
host and launcher pid) takes its own lease over at once.

S3 has no compare-and-swap that every S3-compatible store offers, so acquiring is: read,
refuse if held, write, wait `settle_s`, read again and refuse unless the lease is still
ours. Two jobs starting within the same instant both see their own write or the other's;
only the last writer proceeds, and the other refuses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from llm import storage

log = logging.getLogger(__name__)

LEASE = "lease.json"


class RunLeaseError(RuntimeError):
    """Another job trains this run dir, or took it over from us."""


def default_job_id() -> str:
    """Who we are across restarts of the same job: `LLM_JOB_ID` if set (e.g. the
    PyTorchJob's name), else torchrun's run id, else host and launcher (torchrun agent)."""
    if job := os.environ.get("LLM_JOB_ID"):
        return job
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"torchrun:{run_id}"
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
    return f"{socket.gethostname()}:{launcher}"


class RunLease:
    """Held by rank 0 of the job training `run_uri`, from `acquire` to `release`."""

    def __init__(
        self,
        run_uri: str,
        job_id: str | None = None,
        stale_after_s: float = 120.0,
        settle_s: float = 1.0,
    ) -> None:
        self.uri = storage.join(run_uri, LEASE)
        self.run_uri, self.job = run_uri, job_id or default_job_id()
        self.stale_after_s, self.settle_s = stale_after_s, settle_s
        self.token = uuid.uuid4().hex  # this process, among restarts of the same job
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign object: nobody holds it validly
            return None

    def _write(self) -> None:
        record = {"job": self.job, "token": self.token, "host": socket.gethostname(),
                  "pid": os.getpid(), "heartbeat": time.time()}  # fmt: skip
        storage.write_bytes(self.uri, json.dumps(record).encode())

    def _held_by_other(self, record: dict[str, Any] | None) -> str | None:
        """A description of the live holder of `record` if it is another job, else None."""
        if not record or record.get("job") == self.job:
            return None
        age = time.time() - float(record.get("heartbeat", 0))
        if age >= self.stale_after_s:
            return None
        return (
            f"job {record.get('job')!r} (host {record.get('host')}, pid {record.get('pid')},"
            f" heartbeat {age:.0f}s ago)"
        )

    def acquire(self) -> None:
        """Take the lease or raise RunLeaseError naming the run dir and the holder.

        A lease of another job that looks fresh is watched for up to `stale_after_s`: a
        heartbeat seen to advance proves its holder alive (refused at once); one that stays
        still was left by a dead job (say, rank 0 restarted on another node) and is taken
        over, whatever the clocks of the two hosts say.
        """
        record = self._read()
        holder = self._held_by_other(record)
        deadline = time.monotonic() + self.stale_after_s
        while holder is not None and time.monotonic() < deadline:
            time.sleep(min(self.stale_after_s / 8, max(deadline - time.monotonic(), 0)))
            latest = self._read()
            alive = latest and latest.get("heartbeat") != (record or {}).get("heartbeat")
            record, holder = latest, self._held_by_other(latest)
            if alive and holder is not None:
                break
        else:
            holder = None  # no lease, ours, stale, or still for a whole timeout: take it
        if holder is None:
            self._write()
            time.sleep(self.settle_s)
            record = self._read()
            if not record or record.get("token") != self.token:
                holder = self._held_by_other(record) or f"job {(record or {}).get('job')!r}"
        if holder is not None:
            raise RunLeaseError(
                f"{self.run_uri} is being trained by {holder}; refusing to start a second "
                f"trainer on it (the lease, {self.uri}, goes stale {self.stale_after_s:.0f}s "
                "after its holder's last heartbeat)"
            )
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()
        log.info("holding the lease on %s as job %s", self.run_uri, self.job)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                record = self._read()
                if not record or record.get("token") != self.token:
                    self.lost = f"taken over by job {(record or {}).get('job')!r}"
                    log.error("lost the lease on %s: %s", self.run_uri, self.lost)
                    return
                self._write()
            except Exception as e:  # a store hiccup: the next beat tries again
                log.warning("lease heartbeat on %s failed: %s", self.run_uri, e)

    def check(self) -> None:
        """Raise RunLeaseError if the lease was taken over (say, after we stalled for longer
        than `stale_after_s`): we must not write checkpoints any more."""
        if self.lost:
            raise RunLeaseError(f"{self.run_uri}: lost the run's lease ({self.lost})")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (best effort: a lease
        left behind goes stale, and a restart of this job takes it over anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            record = self._read()
            if record and record.get("token") == self.token:
                fs, path = storage.url_to_fs(self.uri)
                fs.rm_file(path)
        except Exception as e:
            log.warning("could not release the lease on %s: %s", self.run_uri, e)
