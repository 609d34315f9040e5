"""Small helpers shared by the service tests."""

from __future__ import annotations

import time

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
