"""`llm.core.openmp`: a thread done with torch gives its OpenMP workers back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, time
import torch
from llm.core.openmp import release_openmp_threads

torch.set_num_threads(2)

def tasks():
    return len(os.listdir("/proc/self/task"))

def work():  # one parallel region over both threads
    torch.ones(1 << 22).mul_(2)

work()
held = tasks()
released = release_openmp_threads()
deadline = time.monotonic() + 5
while tasks() >= held and time.monotonic() < deadline:
    time.sleep(0.01)
after = tasks()
work()
print(json.dumps({"released": released, "held": held, "after": after, "again": tasks()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp is torch's Linux runtime")
def test_release_frees_the_calling_threads_workers_until_its_next_parallel_region() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True
    )
    counts = json.loads(out.stdout.splitlines()[-1])
    assert counts["released"] is True
    assert counts["after"] == counts["held"] - 1  # its one worker (two threads) exited
    assert counts["again"] == counts["held"]  # the next region started a new one
