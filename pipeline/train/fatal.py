"""Failures that a retry would only repeat: recorded once, not replayed.

Ray Train restarts the worker group ``scaling.max_failures`` times after any worker error
(its ``FailureConfig`` has no per-exception policy). A run past its bad-sample budget or its
skipped-step budget would fail the same way each time, after re-reading the data up to the
same point. So the rank that hits one writes ``pipeline-fatal.json`` next to the run's
checkpoints; a restarted attempt finds it and fails at once with the same line. A new launch
(``pipeline train`` / ``run_training``) clears it, so relaunching after fixing the cause
resumes from the last checkpoint as usual.
"""

from __future__ import annotations

import contextlib
import json

from pipeline import storage
from pipeline.data.errors import BadDataError
from pipeline.errors import PipelineError
from pipeline.train.step import SkipBudgetExceeded

FATAL_NAME = "pipeline-fatal.json"
DETERMINISTIC: tuple[type[PipelineError], ...] = (BadDataError, SkipBudgetExceeded)


def fatal_url(storage_path: str, name: str) -> str:
    """Where a run's deterministic failure is recorded (``storage_path`` as Ray sees it)."""
    return storage.join(storage_path, name, FATAL_NAME)


def record(url: str, exc: BaseException, step: int) -> bool:
    """Record ``exc`` if it is deterministic; never raises (the original error matters more)."""
    if not isinstance(exc, DETERMINISTIC):
        return False
    doc = {"type": type(exc).__name__, "message": str(exc), "step": step}
    with contextlib.suppress(Exception):
        storage.put_atomic(url, json.dumps(doc).encode(), retries=1)
        return True
    return False


def check(url: str) -> None:
    """Raise the recorded deterministic failure of this launch, if there is one."""
    try:
        doc = json.loads(storage.read_bytes(url, retries=1))
    except Exception:  # none recorded (or unreadable: then train and find out again)
        return
    cls = {c.__name__: c for c in DETERMINISTIC}.get(doc.get("type"), PipelineError)
    raise cls(
        f"{doc.get('message', '?')} (at step {doc.get('step', '?')}; not retried: a "
        "restart would fail the same way)"
    )


def clear(url: str) -> None:
    """Forget a recorded failure: a new launch tries again."""
    storage.remove(url, retries=1)
