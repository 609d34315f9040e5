"""Checkpoint uploads that outlive a storage restart.

Ray Train persists a reported checkpoint with one ``pyarrow.fs.copy_files``: a storage
endpoint that restarts at that moment fails the report, and with it the attempt (a restart
from the checkpoint before, its steps replayed, one of ``scaling.max_failures`` spent).
:func:`retrying` wraps the upload in the data's retry policy (``data.retries`` retries,
``data.retry_backoff`` doubling, capped at 8 s): the whole folder is copied again until it
lands. A partial copy is never a checkpoint: ``checksums.json`` is verified on load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_BACKOFF", "retrying"]

MAX_BACKOFF = 8.0  # seconds, as the shard reader's


def retrying(
    persist: Callable[[Any, str], Any],
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[Any, str], Any]:
    """``persist(checkpoint, dir_name)`` (Ray's upload), retried ``retries`` times on an
    ``OSError`` (pyarrow's I/O errors), ``backoff`` seconds doubling between tries; one
    warning line per failed try. The last error propagates."""

    def upload(checkpoint, dir_name: str):
        for attempt in range(retries + 1):
            try:
                return persist(checkpoint, dir_name)
            except OSError as e:
                if attempt == retries:
                    raise
                wait = min(backoff * 2**attempt, MAX_BACKOFF)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                print(
                    f"warning: checkpoint upload {dir_name} failed ({type(e).__name__}: "
                    f"{first}); retry {attempt + 1} of {retries} in {wait:.1f}s",
                    flush=True,
                )
                sleep(wait)
        raise AssertionError("unreachable")

    return upload
