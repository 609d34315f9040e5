"""Test-only fault injection for the worker loop; every hook is a no-op unless its variable is set.

The fault tests set these on the cluster (``runtime_env.env_vars`` or the head's env):

    PIPELINE_FAULT_NAN_STEP     comma-separated 1-based steps whose loss becomes NaN, on
                                rank PIPELINE_FAULT_NAN_RANK only when that is set
    PIPELINE_FAULT_KILL_STEP    the step at which rank PIPELINE_FAULT_KILL_RANK (default 1)
                                SIGKILLs itself mid-step, once: PIPELINE_FAULT_MARKER is the
                                file that records it did, PIPELINE_FAULT_KILL_DELAY the seconds
                                of "work" before the kill (default 5: Ray Train polls a
                                worker every 2 s, and a checkpoint reported but not yet
                                polled is not the one a restart gets); PIPELINE_FAULT_KILL_AT
                                "report" moves the kill from mid-step to the step's report
                                (after its gather, before ``ray.train.report``)
    PIPELINE_FAULT_HOLD         "<step>:<file>": rank 0, at that step's report (its checkpoint
                                written, not yet uploaded), creates <file>.reached and waits
                                (at most 300 s) for <file>.go, while the test stops a service
    PIPELINE_RECORD_KEYS_DIR    a folder where every rank appends "epoch step key" per sample
                                (rank<r>.txt), a line per start of its loop (attempts-rank<r>.txt:
                                how many attempts the run took) and the sha256 of its final
                                weights (weights-rank<r>.txt)
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "corrupt_loss",
    "hold",
    "kill_point",
    "record_attempt",
    "record_keys",
    "record_weights",
    "weights_sha256",
]


def corrupt_loss(step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` as the fault variables make it at 1-based ``step`` on ``rank`` (NaN, or a kill)."""
    nan_rank = os.environ.get("PIPELINE_FAULT_NAN_RANK", "")
    if str(step) in os.environ.get("PIPELINE_FAULT_NAN_STEP", "").split(","):
        if not nan_rank or int(nan_rank) == rank:
            loss = loss * float("nan")
    kill_point("step", step, rank)
    return loss


def kill_point(where: str, step: int, rank: int) -> None:
    """The kill hook at 1-based ``step``: ``where`` is "step" (mid-step, the default point)
    or "report" (the step's report); it fires where PIPELINE_FAULT_KILL_AT says."""
    kill = os.environ.get("PIPELINE_FAULT_KILL_STEP")
    marker = os.environ.get("PIPELINE_FAULT_MARKER", "")
    if where != os.environ.get("PIPELINE_FAULT_KILL_AT", "step"):
        return
    if kill == str(step) and rank == int(os.environ.get("PIPELINE_FAULT_KILL_RANK", "1")):
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("PIPELINE_FAULT_KILL_DELAY", "5")))  # the work
            os.kill(os.getpid(), signal.SIGKILL)


def hold(step: int, rank: int) -> None:
    """Rank 0 waits at ``step``'s report for the test's go (PIPELINE_FAULT_HOLD), once."""
    at, _, path = os.environ.get("PIPELINE_FAULT_HOLD", "").partition(":")
    if rank != 0 or at != str(step) or Path(f"{path}.reached").exists():
        return
    Path(f"{path}.reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + 300
    while not Path(f"{path}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def record_keys(rank: int, epoch: int, step: int, keys: Iterable[str]) -> None:
    """Append which sample keys ``rank`` trained on at ``step`` (the exactly-once tests)."""
    folder = os.environ.get("PIPELINE_RECORD_KEYS_DIR")
    if folder:
        with open(Path(folder) / f"rank{rank}.txt", "a") as f:
            f.write("".join(f"{epoch} {step} {k}\n" for k in keys))


def _record(name: str, line: str) -> None:
    folder = os.environ.get("PIPELINE_RECORD_KEYS_DIR")
    if folder:
        with open(Path(folder) / name, "a") as f:
            f.write(line + "\n")


def record_attempt(rank: int) -> None:
    """Note that ``rank`` started (or restarted) its loop: one line per attempt."""
    _record(f"attempts-rank{rank}.txt", str(os.getpid()))


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """The sha256 of a state dict: every name and every tensor's exact bytes."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record_weights(rank: int, step: int, model: torch.nn.Module) -> None:
    """Append ``step`` and the :func:`weights_sha256` of ``model``'s final weights."""
    _record(f"weights-rank{rank}.txt", f"{step} {weights_sha256(model.state_dict())}")
