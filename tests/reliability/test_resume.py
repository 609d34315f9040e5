"""Resuming from a torn or corrupt latest checkpoint: the run's newest earlier checkpoint that
verifies is used, the bad one is named; none verifies: an error, never a fresh start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from pipeline import storage
from pipeline.train import checkpoint, resume
from pipeline.train.checkpoint import CheckpointError
from pipeline.train.driver import run_training
from pipeline.train.faults import weights_sha256
from tests.helpers import BATCH, N_TRAIN, keys_by_step, make_job, read_keys, wait_for


def write_run(root: Path, steps: list[int]) -> list[Path]:
    """Checkpoint folders as Ray names them, one per step, oldest first."""
    out = []
    for i, step in enumerate(steps):
        torch.manual_seed(step)
        d = root / f"checkpoint_2026-01-01_00-00-{i:02d}.000000"
        checkpoint.save(d, model=torch.nn.Linear(3, 2), state={"step": step})
        out.append(d)
    return out


def tear(path: Path) -> None:
    """Cut a file in half on disk, as an interrupted upload or a bad disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_latest_good_is_used(tmp_path):
    dirs = write_run(tmp_path / "run", [8, 16])
    r = resume.load(Checkpoint.from_directory(str(dirs[-1])))
    assert r.saved["state"] == {"step": 16} and r.path == str(dirs[-1]) and r.bad == []


@pytest.mark.parametrize("name", ["model.safetensors", "state.json", "checksums.json"])
def test_corrupt_latest_falls_back_to_the_previous(tmp_path, name):
    dirs = write_run(tmp_path / "run", [8, 16, 24])
    tear(dirs[-1] / name)
    r = resume.load(Checkpoint.from_directory(str(dirs[-1])))
    assert r.saved["state"] == {"step": 16} and r.path == str(dirs[1])
    (bad,) = r.bad
    assert bad.startswith(str(dirs[-1])), bad  # names the bad checkpoint on storage


def test_no_checkpoint_verifies_is_an_error_naming_each(tmp_path):
    dirs = write_run(tmp_path / "run", [8, 16])
    for d in dirs:
        tear(d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        resume.load(Checkpoint.from_directory(str(dirs[-1])))
    msg = str(e.value)
    assert "no checkpoint of the run verifies (2 tried)" in msg and "\n" not in msg
    assert all(f"{d}/model.safetensors: checksum mismatch" in msg for d in dirs), msg


def test_restore_reads_its_own_download_not_a_shared_folder(fmnist_url, s3_env, tmp_path):
    """Two ranks on one node restore the same S3 checkpoint. Ray's ``as_directory`` gives
    both the same /tmp/checkpoint_tmp_<uuid> folder, where the other rank writes while this
    one reads. Here the other rank holds that folder's download lock and leaves torn bytes in
    it: the restore must still load the checkpoint intact (from a download of its own)."""
    import shutil
    import threading
    import types

    import pyarrow.fs
    from ray.air._internal.filelock import TempFileLock

    from pipeline.train.loop import start_run

    tracking = types.SimpleNamespace(uri="http://127.0.0.1:9")  # no MLflow call is made
    job = make_job(fmnist_url, tracking, str(tmp_path / "unused"), "shared", 2)
    _, run = start_run(job, 0, 2, "", None, lambda m: m)
    run.step = 8
    local = tmp_path / "ckpt"
    run.write(str(local), [{"run": {}, "epoch": {}}] * 2, "")
    name = "checkpoint_2026-01-01_00-00-00.000000"
    url = s3_env.make_bucket("ckpt-shared") + f"/run/{name}"
    for f in local.iterdir():
        storage.put_atomic(f"{url}/{f.name}", f.read_bytes())
    fs = pyarrow.fs.S3FileSystem(
        access_key=s3_env.access_key,
        secret_key=s3_env.secret_key,
        endpoint_override=s3_env.endpoint_url,
    )
    ckpt = Checkpoint(url.removeprefix("s3://"), filesystem=fs)
    shared = Path(ckpt._get_temporary_checkpoint_dir())
    shutil.copytree(local, shared)
    tear(shared / "model.safetensors")  # the other rank's bytes, mid-rewrite
    locked, release = threading.Event(), threading.Event()

    def other_rank() -> None:
        with TempFileLock(str(shared), timeout=0):
            locked.set()
            release.wait(30)

    t = threading.Thread(target=other_rank, daemon=True)
    t.start()
    try:
        assert locked.wait(10)
        threading.Timer(1.0, release.set).start()  # the other rank "finishes" after 1 s
        _, resumed = start_run(job, 1, 2, "", ckpt, lambda m: m)
    finally:
        release.set()
        t.join(10)
        shutil.rmtree(shared, ignore_errors=True)
    assert resumed.step == 8
    assert weights_sha256(resumed.vae.state_dict()) == weights_sha256(run.vae.state_dict())


@pytest.mark.slow
def test_run_resumes_from_previous_checkpoint_when_latest_is_torn(
    fmnist_url, mlflow_server, ray_session, s3, tmp_path, capfd
):
    """A real relaunch on S3: epoch 1 ends with checkpoints at steps 24 and 32 kept; the
    step-32 one is torn on S3; the relaunch (2 epochs) resumes at step 24, in one attempt."""
    keys_dir = ray_session()
    bucket = s3.make_bucket("ckpt-torn") + "/ray"
    run_training(make_job(fmnist_url, mlflow_server, bucket, "torn", 1, epochs=1))
    steps = N_TRAIN // BATCH  # 32 a worker and epoch
    folders = [n for n in storage.listdir(f"{bucket}/torn") if n.startswith("checkpoint_2")]
    assert len(folders) == 2  # steps 24 and 32 (scaling.num_to_keep)
    latest = f"{bucket}/torn/{folders[-1]}/model.safetensors"
    data = storage.read_bytes(latest)
    storage.put_atomic(latest, data[: len(data) // 2])

    res = run_training(make_job(fmnist_url, mlflow_server, bucket, "torn", 1, epochs=2))
    assert res.metrics["step"] == 2 * steps
    attempts = (keys_dir / "attempts-rank0.txt").read_text().split()
    assert len(attempts) == 2, attempts  # one per launch: the torn checkpoint cost no retry
    by_step = keys_by_step(read_keys(keys_dir)[0])
    # steps 25..32 ran in both launches (the second resumed at 24), every other step once
    assert sorted(by_step) == [
        (e, s) for e in range(2) for s in range(e * steps + 1, (e + 1) * steps + 1)
    ]
    for (e, s), ks in by_step.items():
        assert len(ks) == (2 if 24 < s <= 32 else 1) * BATCH, (e, s)
    out = []
    bad = f"{bucket.removeprefix('s3://')}/torn/{folders[-1]}/model.safetensors: checksum mismatch"

    def warned() -> bool:
        out.append(capfd.readouterr().out)
        return bad in "".join(out) and "resumed from checkpoint at epoch 0 step 24" in "".join(out)

    wait_for(warned, 30, "the warning naming the torn checkpoint")
