"""The OpenMP runtime's worker threads, for a process that loads a model on one thread
and runs it on another (the engine: load and warm up, then a scheduler thread steps).

GNU OpenMP (libgomp, the runtime torch's Linux wheels ship) gives each thread that starts
a parallel region a pool of workers of its own, kept until that thread exits. Between
regions its workers spin, waiting for the next one, unless the process holds more OpenMP
threads than there are CPUs: then they spin only briefly and sleep, and every parallel
region waits for its workers to wake. A decode step runs a few hundred regions,
so with the loading thread's pool still held on a 2-core box, the scheduler thread's
decode steps of the 82M benchmark model took 14.0 ms at 8 rows against 10.4 ms once the
loading thread gave its workers back (`docs/benchmarks.md`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t; libgomp frees the pool for either kind


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (torch's own copy), or None: not Linux, or
    another OpenMP runtime (what this module does is for libgomp's per-thread pools)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith("libgomp") and ".so" in path:
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle torch uses
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                return lib
            except (OSError, AttributeError) as e:  # no OpenMP 5.0 API in an old libgomp
                log.debug("openmp_pause_unavailable", extra={"path": path, "error": str(e)})
                return None
    return None


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP workers (OpenMP 5.0's `omp_pause_resource_all`);
    a later parallel region on this thread starts new ones. Call it on a thread that is
    done with torch (after loading and warming up a model another thread will run). True
    where libgomp freed them; False elsewhere, changing nothing."""
    lib = _libgomp()
    return lib is not None and lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
