"""Faults that hit one rank of a 2-worker Ray Train run, on a real local Ray cluster."""

from __future__ import annotations

import pytest

from pipeline.train import checkpoint
from pipeline.train.driver import run_training
from pipeline.train.faults import weights_sha256
from tests.helpers import BATCH, N_TRAIN, make_job

pytestmark = pytest.mark.slow


def test_nan_on_one_rank_is_skipped_by_every_rank(fmnist_url, mlflow_server, ray_session, tmp_path):
    """The loss turns NaN at step 5 on rank 1 only: rank 0, whose loss was finite, skips
    that step too (the NaN gradients reach it through DDP's all-reduce), so both ranks end
    with bit-identical weights, equal to the checkpoint's."""
    keys_dir = ray_session(PIPELINE_FAULT_NAN_STEP="5", PIPELINE_FAULT_NAN_RANK="1")
    job = make_job(fmnist_url, mlflow_server, str(tmp_path / "ckpt"), "nan-rank", 2, epochs=1)
    res = run_training(job)
    steps = N_TRAIN // (2 * BATCH)
    assert res.metrics["step"] == steps
    final = {r: (keys_dir / f"weights-rank{r}.txt").read_text().split() for r in (0, 1)}
    assert final[0] == final[1] == [str(steps), final[1][1]], final
    saved = checkpoint.load(res.checkpoint_url)  # rank 0's counters and weights
    assert saved["state"]["step"] == steps
    assert saved["state"]["skipped_steps"] == 1  # rank 0 skipped, though its loss was finite
    assert weights_sha256(saved["model"]) == final[1][1]
