"""Small helpers shared by the service tests.

ROOT                    the repository
wait_for                poll a predicate with a deadline
require                 skip a test whose tool is missing; under CI=true, fail it instead
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def require(condition, reason: str, gpu: bool = False) -> None:
    """Skip the calling test unless ``condition`` holds (a tool or binary it needs exists).
    Under ``CI=true`` (``.ci/run``) it fails instead: evidence must not vanish as a skip. A
    ``gpu`` test fails there only where ``CI_GPU=true`` says the CI machine has a GPU.
    The one place tests skip; never ``pytest.skip``/``skipif``/``importorskip`` directly."""
    if condition:
        return
    if os.environ.get("CI") == "true" and (not gpu or os.environ.get("CI_GPU") == "true"):
        pytest.fail(f"{reason} (CI=true: a missing requirement fails, it does not skip)")
    pytest.skip(reason)
