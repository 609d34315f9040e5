"""Test-only fault injection for the worker loop; every hook is a no-op unless its variable is set.

The fault tests set these on the cluster (``runtime_env.env_vars`` or the head's env):

    PIPELINE_FAULT_NAN_STEP     comma-separated 1-based steps whose loss becomes NaN
    PIPELINE_FAULT_KILL_STEP    the step at which rank PIPELINE_FAULT_KILL_RANK (default 1)
                                SIGKILLs itself mid-step, once: PIPELINE_FAULT_MARKER is the
                                file that records it did, PIPELINE_FAULT_KILL_DELAY the seconds
                                of "work" before the kill (default 3)
    PIPELINE_RECORD_KEYS_DIR    a folder where every rank appends "epoch step key" per sample
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["corrupt_loss", "record_keys"]


def corrupt_loss(step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` as the fault variables make it at 1-based ``step`` on ``rank`` (NaN, or a kill)."""
    if str(step) in os.environ.get("PIPELINE_FAULT_NAN_STEP", "").split(","):
        loss = loss * float("nan")
    kill = os.environ.get("PIPELINE_FAULT_KILL_STEP")
    marker = os.environ.get("PIPELINE_FAULT_MARKER", "")
    if kill == str(step) and rank == int(os.environ.get("PIPELINE_FAULT_KILL_RANK", "1")):
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("PIPELINE_FAULT_KILL_DELAY", "3")))  # mid-step work
            os.kill(os.getpid(), signal.SIGKILL)
    return loss


def record_keys(rank: int, epoch: int, step: int, keys: Iterable[str]) -> None:
    """Append which sample keys ``rank`` trained on at ``step`` (the exactly-once tests)."""
    folder = os.environ.get("PIPELINE_RECORD_KEYS_DIR")
    if folder:
        with open(Path(folder) / f"rank{rank}.txt", "a") as f:
            f.write("".join(f"{epoch} {step} {k}\n" for k in keys))
