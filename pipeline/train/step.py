"""One optimizer step and the guards around it: skipped non-finite steps, skip and
bad-sample counts; the step's precision (autocast, fp16 loss scaling) and the model's
layout on its device. Pure torch, no Ray: the worker loop calls it, tests call it directly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import VAE, training_terms


class Objective(nn.Module):
    """The training loss as a module, so DDP's forward hooks see it and all-reduce gradients:
    the negative ELBO, or with ``objective="iwae"`` the negative IWAE bound on ``iwae_k``
    draws (``optim.objective``, ``optim.iwae_train_k``)."""

    def __init__(self, vae: VAE, objective: str = "elbo", iwae_k: int = 1):
        super().__init__()
        self.vae, self.objective, self.iwae_k = vae, objective, iwae_k

    def forward(
        self,
        x: torch.Tensor,
        kl_weight: float,
        free_bits: float,
        generator: torch.Generator | None = None,
    ) -> dict:
        return training_terms(
            self.vae,
            x,
            objective=self.objective,
            iwae_k=self.iwae_k,
            kl_weight=kl_weight,
            free_bits=free_bits,
            generator=generator,
        )


@dataclass
class Precision:
    """The step's arithmetic: ``fp32``; ``bf16`` autocast; or ``fp16`` autocast with a loss
    scaler (fp16's range is too small for raw gradients). The ELBO's densities and per-image
    sums stay float32 under autocast (``pipeline.model.vae``)."""

    name: str  # fp32 | bf16 | fp16, resolved
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        """``auto``: bf16 on a CUDA device that supports it (Ampere and newer), else fp32."""
        if name == "auto":
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            name = "bf16" if cuda_bf16 else "fp32"
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {name!r}")
        return cls(name, torch.amp.GradScaler(device.type) if name == "fp16" else None)

    def autocast(self, device: torch.device) -> AbstractContextManager:
        dtype = torch.float16 if self.name == "fp16" else torch.bfloat16
        return torch.autocast(device.type, dtype=dtype, enabled=self.name != "fp32")


FP32 = Precision("fp32")


def prepare_layout(vae: VAE, device: torch.device, compile: bool = False) -> VAE:
    """The model's layout for ``device``, before it moves there and is wrapped (DDP):
    channels_last for the conv model on CUDA (cuDNN's fast path for NHWC convolutions; inputs
    follow the weights' format inside each conv), and with ``compile`` the encoder and decoder
    compiled in place (``nn.Module.compile``: the state-dict keys, so checkpoints, unchanged)."""
    if device.type == "cuda" and vae.config.arch == "conv":
        vae.to(memory_format=torch.channels_last)
    if compile:
        vae.encoder.compile()
        vae.decoder.compile()
    return vae


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The reparameterization-noise seed of ``rank`` at ``step``: different on every rank (so
    averaging gradients over ranks averages independent noise) and a function of the step
    alone, so a resumed run continues the noise instead of replaying it."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


@dataclass
class StepResult:
    out: dict  # training_terms of the batch (before any injected fault)
    grad_norm: torch.Tensor  # total gradient norm before clipping; non-finite if skipped
    skipped: bool  # a non-finite loss or gradient: counted against the skip budget
    overflow: bool = False  # fp16: the scaled gradients overflowed; the scaler lowers its
    # scale and the step is dropped, as loss scaling does by design (not counted as skipped)


def train_step(
    model: nn.Module,
    vae: VAE,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    kl_weight: float,
    free_bits: float,
    grad_clip: float,
    precision: Precision = FP32,
    ema: VAE | None = None,
    ema_decay: float = 0.0,
    inject: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """One optimizer step on batch ``x``, skipped whole if the loss or a gradient is not finite.

    ``model`` is ``Objective(vae)``, possibly DDP-wrapped. A skipped step leaves the weights,
    the buffers (BatchNorm running stats saw the bad batch), the optimizer state and the EMA
    exactly as they were. ``inject`` maps the loss before the check (fault-injection tests);
    ``generator`` draws the reparameterization noise; ``precision`` is the autocast (and with
    fp16 the loss scaler, whose overflows are dropped steps, not skipped ones).
    """
    device = x.device
    scaler = precision.scaler
    buffers = [b.detach().clone() for b in vae.buffers()]
    with precision.autocast(device):
        out = model(x, kl_weight, free_bits, generator)
    loss = out["loss"] if inject is None else inject(out["loss"])
    loss_finite = bool(torch.isfinite(loss))
    if not loss_finite:
        # NaN into every gradient: DDP all-reduces it, so every rank skips this step.
        loss = sum((p * float("nan")).sum() for p in vae.parameters() if p.requires_grad)
    opt.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(opt)  # clip and check the true gradients
    gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip or float("inf"))
    if not torch.isfinite(gnorm):
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(vae.buffers(), buffers):
                b.copy_(saved)
        if scaler is not None:
            scaler.update()  # found inf: the next step uses half the scale
            if loss_finite:
                return StepResult(out, gnorm, False, overflow=True)
        return StepResult(out, gnorm, True)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)  # gradients already unscaled and finite: a plain step
        scaler.update()
    if ema is not None:
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(p, 1 - ema_decay)
    return StepResult(out, gnorm, False)


class SkipBudgetExceeded(PipelineError):
    """More steps were skipped for a non-finite loss or gradient than ``max_skipped_steps``."""


class SkipBudget:
    """Counts skipped steps; more than ``limit`` ends the run with one clear line."""

    def __init__(self, limit: int, count: int = 0):
        self.limit, self.count = limit, count

    def record(self, skipped: bool) -> None:
        if not skipped:
            return
        self.count += 1
        if self.count > self.limit:
            raise SkipBudgetExceeded(
                f"{self.count} steps skipped for a non-finite loss or gradient "
                f"(optim.max_skipped_steps={self.limit}); lower optim.lr or check the data"
            )


class BadSamples:
    """Samples the reader skipped (``batch["skipped"]``), per reason, over the whole run.

    ``base`` is the run total restored from a checkpoint; ``own`` what this process has
    counted since; ``epoch`` what it counted in the current epoch (to reconcile with the
    reader's per-epoch count when the reader fails mid-batch). MLflow gets the run total
    (summed over ranks), Prometheus each rank's own.
    """

    def __init__(self, base: dict[str, int] | None = None):
        self.base: Counter = Counter(base or {})
        self.own: Counter = Counter()
        self.epoch: Counter = Counter()

    def add(self, skipped: Iterable[dict]) -> int:
        """Count one batch's skipped samples; returns how many."""
        n = 0
        for bad in skipped:
            self.own[bad["bad"]] += 1
            self.epoch[bad["bad"]] += 1
            n += 1
        return n

    def reconcile(self, reader_epoch: dict[str, int]) -> int:
        """Count what the reader saw this epoch but never handed over (it raised first, e.g.
        past its error budget); returns how many."""
        missing = Counter(reader_epoch) - self.epoch
        self.own.update(missing)
        self.epoch.update(missing)
        return sum(missing.values())

    def totals(self, others: Iterable[dict[str, int]] = ()) -> dict[str, int]:
        """Run totals per reason: the restored base, this rank's and ``others``' counts."""
        out = self.base + self.own
        for counts in others:
            out.update(counts)
        return dict(out)

    @staticmethod
    def as_metrics(totals: dict[str, int]) -> dict[str, float]:
        """``{"bad_samples": N, "bad_samples.<reason>": n, ...}`` for MLflow."""
        return {
            "bad_samples": float(sum(totals.values())),
            **{f"bad_samples.{k}": float(v) for k, v in sorted(totals.items())},
        }
