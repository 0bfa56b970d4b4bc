"""Retention: delete all but a run's newest checkpoints, never the newest known good one."""

from __future__ import annotations

import logging

from llm.checkpoint.commit import delete, scan

logger = logging.getLogger(__name__)


def retain(run_uri: str, keep_last: int, *, keep: str | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` committed checkpoints; return deleted uris.

    ``keep`` (the newest checkpoint known to verify byte for byte) is never deleted, so a
    run always has one to resume from even if newer ones turn out bad. Incomplete dirs
    older than the newest committed one are debris of crashed saves and go too; newer ones
    may be a save in progress and are left alone. Best effort: a failed delete is logged
    and the rest go on (an old checkpoint left behind costs space, not correctness).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest is never deleted), got {keep_last}")
    scanned = scan(run_uri)
    committed = [(step, uri) for step, uri, reason in scanned if reason is None]
    if not committed:
        return []
    newest_step = committed[-1][0]
    doomed = {uri for _, uri in committed[:-keep_last]}
    doomed |= {uri for step, uri, reason in scanned if reason is not None and step < newest_step}
    doomed.discard(keep)
    deleted = []
    for step, uri, _ in scanned:
        if uri not in doomed:
            continue
        try:
            delete(uri)
        except Exception as e:  # any store error: keep the checkpoint, go on
            logger.warning("retain: could not delete %s (step %d): %s", uri, step, e)
            continue
        logger.info("retain: deleted %s (step %d)", uri, step)
        deleted.append(uri)
    return deleted
