"""Counter-based sampling: global batch `step` is a pure function of (seed, step).

No sampler state but the step counter, so a resumed run continues with exactly the batches
the uninterrupted run would have seen, prefetching can run ahead freely, and the global
batch (all ranks together) does not depend on the number of ranks: rank `r` of `N` takes
rows `[r*B, (r+1)*B)` with `B = global_batch_size / N`, which also keeps an elastic
restart with a different world size on the same data sequence.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def random_starts(seed: int, step: int, count: int, high: int) -> np.ndarray:
    """`count` uniform integers in [0, high) for global batch `step` (with replacement)."""
    return np.random.default_rng([seed, step]).integers(0, high, size=count)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, n]).permutation(n)


def epoch_indices(seed: int, step: int, count: int, n: int) -> np.ndarray:
    """Items for global batch `step`: each epoch visits all `n` items once, freshly shuffled."""
    q = np.arange(step * count, (step + 1) * count)
    epochs, pos = q // n, q % n
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _permutation(seed, int(e), n)[pos[sel]]
    return out


def rank_slice(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of a global batch's rows."""
    per = len(rows) // world_size
    return rows[rank * per : (rank + 1) * per]
