"""One optimizer step and the guards around it: skipped non-finite steps, skip and
bad-sample counts. Pure torch, no Ray: the worker loop calls it, tests call it directly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import VAE, elbo_terms


class Objective(nn.Module):
    """The negative ELBO as a module, so DDP's forward hooks see it and all-reduce gradients."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(
        self,
        x: torch.Tensor,
        kl_weight: float,
        free_bits: float,
        generator: torch.Generator | None = None,
    ) -> dict:
        return elbo_terms(
            self.vae, x, kl_weight=kl_weight, free_bits=free_bits, generator=generator
        )


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The reparameterization-noise seed of ``rank`` at ``step``: different on every rank (so
    averaging gradients over ranks averages independent noise) and a function of the step
    alone, so a resumed run continues the noise instead of replaying it."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


@dataclass
class StepResult:
    out: dict  # elbo_terms of the batch (before any injected fault)
    grad_norm: torch.Tensor  # total gradient norm before clipping; non-finite if skipped
    skipped: bool


def train_step(
    model: nn.Module,
    vae: VAE,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    kl_weight: float,
    free_bits: float,
    grad_clip: float,
    bf16: bool = False,
    ema: VAE | None = None,
    ema_decay: float = 0.0,
    inject: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """One optimizer step on batch ``x``, skipped whole if the loss or a gradient is not finite.

    ``model`` is ``Objective(vae)``, possibly DDP-wrapped. A skipped step leaves the weights,
    the buffers (BatchNorm running stats saw the bad batch), the optimizer state and the EMA
    exactly as they were. ``inject`` maps the loss before the check (fault-injection tests);
    ``generator`` draws the reparameterization noise.
    """
    device = x.device
    buffers = [b.detach().clone() for b in vae.buffers()]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, kl_weight, free_bits, generator)
    loss = out["loss"] if inject is None else inject(out["loss"])
    if not torch.isfinite(loss):
        # NaN into every gradient: DDP all-reduces it, so every rank skips this step.
        loss = sum((p * float("nan")).sum() for p in vae.parameters() if p.requires_grad)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip or float("inf"))
    if not torch.isfinite(gnorm):
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(vae.buffers(), buffers):
                b.copy_(saved)
        return StepResult(out, gnorm, True)
    opt.step()
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
