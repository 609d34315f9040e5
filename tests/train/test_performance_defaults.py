"""GPU performance defaults of the step, checked where CPU can check them: the precision
resolved per device (CPU stays fp32), bf16 autocast, fp16 loss scaling (an overflow is a
dropped step, not a skipped one), the model's layout (channels_last only on CUDA, compile
in place keeps checkpoint keys), the collective timeout and NCCL's error handling."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.model import VAE
from pipeline.model.config import ModelConfig
from pipeline.train.config import TrainJob
from pipeline.train.driver import ray_train_env, torch_config, worker_env
from pipeline.train.step import FP32, Objective, Precision, prepare_layout, train_step
from pipeline.typed import build
from tests.helpers import require

CPU = torch.device("cpu")


def tiny_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE.from_config(ModelConfig(image_size=8, in_channels=1, channels=[4, 8], latent_dim=4))


def batch() -> torch.Tensor:
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def step(vae, opt, precision, **kw):
    return train_step(
        Objective(vae),
        vae,
        opt,
        batch(),
        kl_weight=1.0,
        free_bits=0.0,
        grad_clip=1.0,
        precision=precision,
        generator=torch.Generator().manual_seed(2),
        **kw,
    )


def test_precision_resolves_per_device():
    assert Precision.resolve("auto", CPU) == Precision("fp32")  # CPU behaviour unchanged
    assert Precision.resolve("fp32", CPU).scaler is None
    assert Precision.resolve("bf16", CPU).scaler is None
    fp16 = Precision.resolve("fp16", CPU)
    assert isinstance(fp16.scaler, torch.amp.GradScaler) and fp16.scaler.get_scale() == 2.0**16
    with pytest.raises(ValueError, match="precision must be auto, fp32, bf16 or fp16"):
        Precision.resolve("fp8", CPU)


def test_default_job_precision_is_auto_and_compile_off():
    job = build(TrainJob, {"data": {"train_url": "s3://b/train"}})
    assert job.optim.precision == "auto" and job.optim.compile is False
    assert job.scaling.collective_timeout_s == 600


def test_fp32_step_is_the_plain_step():
    a, b = tiny_vae(), tiny_vae()
    opt_a, opt_b = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    ra, rb = step(a, opt_a, FP32), step(b, opt_b, Precision.resolve("auto", CPU))
    assert torch.equal(ra.out["loss"], rb.out["loss"])
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_bf16_autocast_step_trains_with_a_float32_loss():
    vae = tiny_vae()
    before = copy.deepcopy(vae.state_dict())
    res = step(vae, torch.optim.AdamW(vae.parameters()), Precision.resolve("bf16", CPU))
    assert not res.skipped and not res.overflow
    assert res.out["loss"].dtype == torch.float32 and torch.isfinite(res.out["loss"])
    assert any(not torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # master weights stay fp32


def test_fp16_overflow_drops_the_step_halves_the_scale_and_is_not_skipped():
    vae = tiny_vae()
    opt = torch.optim.AdamW(vae.parameters())
    fp16 = Precision.resolve("fp16", CPU)
    # the initial scale (2**16) overflows at first: halved per step until a step goes through
    overflows = 0
    while step(vae, opt, fp16).overflow:
        overflows += 1
        assert overflows < 20
    assert fp16.scaler.get_scale() == 2.0 ** (16 - overflows)
    before = (copy.deepcopy(vae.state_dict()), copy.deepcopy(opt.state_dict()))
    scale = fp16.scaler.get_scale()
    p = next(vae.parameters())
    handle = p.register_hook(lambda g: g * float("inf"))  # the scaled gradient overflows
    res = step(vae, opt, fp16)
    handle.remove()
    assert res.overflow and not res.skipped and torch.isfinite(res.out["loss"])
    assert fp16.scaler.get_scale() == scale / 2
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    assert opt.state_dict()["state"][0]["step"] == before[1]["state"][0]["step"]
    assert all(q.grad is None for q in vae.parameters())
    nxt = step(vae, opt, fp16)  # the next step trains at the lower scale
    assert not nxt.overflow and not nxt.skipped


def test_fp16_non_finite_loss_is_still_a_skipped_step():
    vae = tiny_vae()
    opt = torch.optim.AdamW(vae.parameters())
    fp16 = Precision.resolve("fp16", CPU)
    res = step(vae, opt, fp16, inject=lambda loss: loss * float("nan"))
    assert res.skipped and not res.overflow
    assert not step(vae, opt, fp16).skipped  # the scaler was reset for the next step


def test_layout_on_cpu_is_unchanged():
    vae = prepare_layout(tiny_vae(), CPU)
    conv = next(m for m in vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # NCHW: CPU behaviour unchanged


def test_conv_model_is_channels_last_on_cuda():
    require(torch.cuda.is_available(), "CUDA-only: no GPU on this machine", gpu=True)
    vae = prepare_layout(tiny_vae(), torch.device("cuda")).cuda()
    conv = next(m for m in vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # inductor compiles C++ kernels: ~30 s on 2 cores
def test_compile_in_place_keeps_the_checkpoint_keys_and_the_numbers():
    eager, compiled = tiny_vae(), prepare_layout(tiny_vae(), CPU, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = batch()
    with torch.no_grad():
        a = eager.decode(eager.encode(x).mode())
        b = compiled.decode(compiled.encode(x).mode())
    assert torch.allclose(a, b, atol=1e-5)


def test_process_group_backend_and_collective_timeout():
    cpu = build(
        TrainJob, {"data": {"train_url": "s3://b/t"}, "scaling": {"collective_timeout_s": 90}}
    )
    gpu = build(TrainJob, {"data": {"train_url": "s3://b/t"}, "scaling": {"use_gpu": True}})
    assert (torch_config(cpu).backend, torch_config(cpu).timeout_s) == ("gloo", 90)
    assert (torch_config(gpu).backend, torch_config(gpu).timeout_s) == ("nccl", 600)
    assert worker_env(cpu, {"A": "1"}) == {"A": "1"}
    assert worker_env(gpu, {"A": "1"}) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "A": "1"}
    off = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    assert worker_env(gpu, off) == off  # the job yaml may turn it off


def test_ray_train_env_is_read_by_ray_trains_controller():
    """Every variable the driver sets is one Ray Train reads and hands to its controller and
    workers: a renamed one would silently fall back to Ray's default (a 2 s poll, which made
    each checkpoint after the first wait ~1.2-1.8 s; 10 min health check)."""
    from ray.train.v2._internal import constants

    job = build(
        TrainJob,
        {
            "data": {"train_url": "s3://b/t"},
            "scaling": {"collective_timeout_s": 90, "worker_start_timeout_s": 30},
        },
    )
    assert ray_train_env(job) == {
        constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR: "0.5",
        constants.COLLECTIVE_TIMEOUT_S_ENV_VAR: "90",
        constants.WORKER_HEALTH_CHECK_TIMEOUT_S_ENV_VAR: "90",
        constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR: "30",
    }
    assert set(ray_train_env(job)) <= constants.ENV_VARS_TO_PROPAGATE
