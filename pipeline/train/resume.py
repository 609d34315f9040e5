"""What a (re)started rank resumes from: the run's newest checkpoint that verifies, fetched
into a folder of the rank's own.

Ray Train hands every rank the run's latest checkpoint (``ray.train.get_checkpoint()``).

* Ranks on one node must not share a download: ``Checkpoint.as_directory()`` gives every
  process on a node the same ``/tmp/checkpoint_tmp_<uuid>`` folder, and a rank that arrives
  after another finished downloading downloads again into it while the first one verifies
  it (a "checksum mismatch" that cost a second restart). Each rank fetches into its own
  temporary folder instead.
* A latest checkpoint that is torn or corrupt on storage would fail every retry the same way:
  the newest earlier checkpoint of the run (Ray keeps ``scaling.num_to_keep``, in folders
  ``checkpoint_<timestamp>`` beside it) that verifies is loaded instead, and the bad ones are
  named. None verifies: an error naming them; never a silent fresh start.

Every rank decides alone, from the same bytes, so all ranks resume from the same step.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

from pipeline.train import checkpoint
from pipeline.train.checkpoint import CheckpointError

__all__ = ["Resumed", "load"]


@dataclass
class Resumed:
    saved: dict[str, Any]  # checkpoint.load's result
    path: str  # the checkpoint it came from (Ray's path: a URL without its scheme on S3)
    bad: list[str] = field(default_factory=list)  # newer checkpoints skipped, one line each


def _fetch(ckpt) -> dict[str, Any]:
    """Download ``ckpt`` into this process's own folder and verify it."""
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        try:
            cdir = ckpt.to_directory(tmp)
        except FileNotFoundError:
            raise CheckpointError(f"{ckpt.path}: missing from storage") from None
        try:
            return checkpoint.load(cdir)
        except CheckpointError as e:  # name the file on storage, not in the temp folder
            raise CheckpointError(str(e).replace(tmp, ckpt.path.rstrip("/"))) from None


def _earlier(ckpt) -> list:
    """The run's checkpoints older than ``ckpt``, newest first (same storage and folder)."""
    import pyarrow.fs

    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    names = sorted(
        (
            i.base_name
            for i in infos
            if i.type == pyarrow.fs.FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.base_name < name  # checkpoint_<%Y-%m-%d_%H-%M-%S.%f>: sorts by time
        ),
        reverse=True,
    )
    return [type(ckpt)(f"{parent}/{n}", filesystem=ckpt.filesystem) for n in names]


def load(ckpt) -> Resumed:
    """The newest of ``ckpt`` (a ``ray.train.Checkpoint``) and the run's earlier checkpoints
    that verifies.

    Raises:
        CheckpointError: none of them verifies (naming each), or there are none besides a
            bad ``ckpt``.
    """
    bad: list[str] = []
    try:
        return Resumed(_fetch(ckpt), ckpt.path)
    except CheckpointError as e:
        bad.append(str(e))
    for older in _earlier(ckpt):
        try:
            return Resumed(_fetch(older), older.path, bad)
        except CheckpointError as e:
            bad.append(str(e))
    raise CheckpointError(
        f"no checkpoint of the run verifies ({len(bad)} tried): " + "; ".join(bad)
    )
