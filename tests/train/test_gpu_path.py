"""The worker's run state on a moved model, without Ray: what ``prepare_model`` does to the
model (to its device) happens before the EMA copy, the optimizer-state restore and the noise
generator, so every piece of state follows the parameters. On CPU a float64 model stands in
for "another device": the old ordering (restore, then prepare) leaves the EMA and AdamW's
moments in float32, and this test fails on it."""

from __future__ import annotations

import pytest
import torch
from ray.train import Checkpoint

from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.stream import make_loader
from pipeline.train.config import TrainJob
from pipeline.train.loop import RunState, start_run
from pipeline.train.step import Objective, noise_seed, train_step
from pipeline.typed import build
from tests.helpers import require

BATCH = 8


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    """64 synthetic 8x8 grayscale images as local shards (48 train, 16 test)."""
    url = str(tmp_path_factory.mktemp("gpu-path") / "synthetic")
    ingest(
        IngestConfig(
            output_url=url,
            source="synthetic",
            synthetic_count=64,
            synthetic_size=8,
            test_fraction=0.25,
            shard_samples=16,
            workers=1,
        ),
        progress=False,
    )
    return url


def make_job(data_url: str, **optim) -> TrainJob:
    return build(
        TrainJob,
        {
            "data": {"train_url": f"{data_url}/train", "num_workers": 0, "shuffle_buffer": 16},
            "model": {"image_size": 8, "in_channels": 1, "channels": [4, 8], "latent_dim": 4},
            "optim": {"batch_size": BATCH, "warmup_steps": 1, "ema_decay": 0.9, "seed": 7, **optim},
        },
    )


def same_module(m: torch.nn.Module) -> torch.nn.Module:
    return m


def to_float64(m: torch.nn.Module) -> torch.nn.Module:
    """What prepare_model does to the model (``.to(device)``), with a dtype CPU can show."""
    return m.to(torch.float64)


def trained_checkpoint(job: TrainJob, directory, steps: int) -> RunState:
    """A float32 run trained ``steps`` steps, checkpointed into ``directory``."""
    model, run = start_run(job, 0, 1, "run-1", None, same_module)
    for batch, _ in zip(make_loader(run.stream), range(steps)):
        res = train_step(
            model,
            run.vae,
            run.opt,
            batch["image"],
            kl_weight=1.0,
            free_bits=0.0,
            grad_clip=1.0,
            ema=run.ema,
            ema_decay=job.optim.ema_decay,
            generator=run.step_noise(),
        )
        assert not res.skipped
        run.sched.step()
        run.step += 1
    run.write(str(directory), [{"run": {}, "epoch": run.stream.bad_counts()}], "run-1")
    return run


def assert_state_follows(run: RunState, dtype: torch.dtype, device: torch.device) -> None:
    params = list(run.vae.parameters())
    assert params and all(p.dtype == dtype and p.device == device for p in params)
    moments = 0
    for p in params:
        state = run.opt.state[p]
        for name in ("exp_avg", "exp_avg_sq"):
            t = state[name]
            assert (t.dtype, t.device, t.shape) == (dtype, device, p.shape), name
            moments += 1
    assert moments == 2 * len(params)
    ema = list(run.ema.state_dict().items())
    for (name, te), (_, tv) in zip(ema, run.vae.state_dict().items(), strict=True):
        assert (te.dtype, te.device) == (tv.dtype, tv.device), name
    assert run.noise.device == device


def test_restore_onto_a_moved_model_puts_all_state_where_the_params_are(data_url, tmp_path):
    job = make_job(data_url)
    written = trained_checkpoint(job, tmp_path / "ckpt", steps=3)

    model, run = start_run(job, 0, 1, "", Checkpoint.from_directory(tmp_path / "ckpt"), to_float64)
    assert (run.step, run.run_id) == (3, "run-1")
    assert_state_follows(run, torch.float64, torch.device("cpu"))
    # the values are the checkpoint's, cast
    for (name, p64), p32 in zip(run.vae.state_dict().items(), written.vae.state_dict().values()):
        assert torch.equal(p64, p32.double()), name
    for p64, p32 in zip(run.ema.parameters(), written.ema.parameters(), strict=True):
        assert torch.equal(p64, p32.double())
    for p64, p32 in zip(run.vae.parameters(), written.vae.parameters(), strict=True):
        s64, s32 = run.opt.state[p64], written.opt.state[p32]
        assert torch.equal(s64["exp_avg"], s32["exp_avg"].double())
        assert float(s64["step"]) == float(s32["step"]) == 3.0
    # and a step runs on it: AdamW and the EMA's lerp_ would raise on mixed dtypes
    x = next(iter(make_loader(run.stream)))["image"].double()
    res = one_step(model, run, x)
    assert not res.skipped and res.out["loss"].dtype == torch.float64
    assert_state_follows(run, torch.float64, torch.device("cpu"))


def one_step(model, run, x):
    """One optimizer step of ``run`` on ``x``, with its EMA and its step's noise."""
    return train_step(
        model,
        run.vae,
        run.opt,
        x,
        kl_weight=1.0,
        free_bits=0.0,
        grad_clip=1.0,
        ema=run.ema,
        ema_decay=0.9,
        generator=run.step_noise(),
    )


def test_fresh_start_on_a_moved_model(data_url):
    _, run = start_run(make_job(data_url), 0, 1, "", None, to_float64)
    assert all(p.dtype == torch.float64 for p in run.ema.parameters())
    assert run.step == 0 and run.noise.device == torch.device("cpu")


def test_restore_onto_the_gpu(data_url, tmp_path):  # pragma: no cover - needs a GPU
    require(torch.cuda.is_available(), "CUDA-only: no GPU on this machine", gpu=True)
    job = make_job(data_url)
    trained_checkpoint(job, tmp_path / "ckpt", steps=2)
    model, run = start_run(
        job, 0, 1, "", Checkpoint.from_directory(tmp_path / "ckpt"), lambda m: m.to("cuda")
    )
    device = torch.device("cuda", torch.cuda.current_device())
    assert_state_follows(run, torch.float32, device)
    x = next(iter(make_loader(run.stream)))["image"].to(device)
    res = one_step(model, run, x)
    assert not res.skipped


# ------------------------------------------------------------ per-rank reparameterization noise


def loss_with(run: RunState, x: torch.Tensor) -> torch.Tensor:
    """The ELBO loss of ``x`` with the run's next-step noise (the weights fixed)."""
    with torch.no_grad():
        return Objective(run.vae)(x, 1.0, 0.0, run.step_noise())["loss"]


def test_noise_seed_is_distinct_per_rank_and_step():
    seeds = {noise_seed(s, r, k) for s in range(3) for r in range(8) for k in range(1000)}
    assert len(seeds) == 3 * 8 * 1000
    assert all(0 <= s < 2**63 for s in seeds)


def test_ranks_draw_different_noise_reproducibly_and_a_resume_continues_it(data_url, tmp_path):
    job = make_job(data_url)
    x = torch.rand(BATCH, 1, 8, 8)
    torch.manual_seed(0)
    _, r0 = start_run(job, 0, 2, "", None, same_module)
    torch.manual_seed(0)
    _, r1 = start_run(job, 1, 2, "", None, same_module)
    r1.vae.load_state_dict(r0.vae.state_dict())  # same weights (DDP broadcasts rank 0's)

    # same seed and step, two ranks: different draws
    z0 = r0.vae.encode(x).rsample(None, r0.step_noise())
    z1 = r1.vae.encode(x).rsample(None, r1.step_noise())
    assert not torch.equal(z0, z1)
    assert not torch.equal(loss_with(r0, x), loss_with(r1, x))
    # the same (seed, rank, step): the same draw, exactly
    assert torch.equal(r0.vae.encode(x).rsample(None, r0.step_noise()), z0)
    assert torch.equal(loss_with(r0, x), loss_with(r0, x))

    # an uninterrupted run's draws at steps 0..5, then a run resumed at step 3
    uninterrupted = []
    for step in range(6):
        r0.step = step
        uninterrupted.append(torch.randn(64, generator=r0.step_noise()))
    assert len({tuple(d.tolist()) for d in uninterrupted}) == 6
    trained_checkpoint(job, tmp_path / "ckpt", steps=3)
    _, resumed = start_run(job, 0, 2, "", Checkpoint.from_directory(tmp_path / "ckpt"), same_module)
    assert resumed.step == 3
    for step in range(3, 6):
        draw = torch.randn(64, generator=resumed.step_noise())
        assert torch.equal(draw, uninterrupted[step]), step
        assert not torch.equal(draw, uninterrupted[0])
        resumed.step += 1


def test_planned_steps_is_the_shorter_of_epochs_and_max_steps():
    from pipeline.train.loop import planned_steps

    assert planned_steps(300, 234, 1) == 234  # the demo: one epoch ends first
    assert planned_steps(100, 234, 1) == 100
    assert planned_steps(0, 234, 2) == 468


def test_fp16_loss_scale_survives_a_resume(data_url, tmp_path):
    """fp16's loss scaler state (scale, growth tracker) is in the checkpoint: a resumed run
    continues with the scale it had, not 2**16 again (which would overflow and drop steps)."""
    job = make_job(data_url, precision="fp16")
    _, run = start_run(job, 0, 1, "run-1", None, same_module)
    scaler = run.precision.scaler
    assert scaler is not None and scaler.get_scale() == 2.0**16
    scaler.scale(torch.ones(()))  # its state exists once a loss was scaled
    scaler.update(new_scale=1024.0)  # what overflows would have brought it down to
    scaler._growth_tracker.fill_(7)
    run.write(str(tmp_path / "ckpt"), [{"run": {}, "epoch": run.stream.bad_counts()}], "run-1")

    _, resumed = start_run(job, 0, 1, "", Checkpoint.from_directory(tmp_path / "ckpt"), same_module)
    state = resumed.precision.scaler.state_dict()
    assert (state["scale"], state["_growth_tracker"]) == (1024.0, 7)
