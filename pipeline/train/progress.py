"""The worker loop's bookkeeping: step timing, throughput, data wait, the logged metric row.

Kept out of :mod:`pipeline.train.loop` so the loop reads as a sequence of steps. One
:class:`Progress` per rank; ``data_wait_fraction`` is the share of wall time between
``next(loader)`` being asked and the batch arriving, over the last ``log_every`` steps.
"""

from __future__ import annotations

import time

import torch

from pipeline.train.metrics import WorkerMetrics
from pipeline.train.step import BadSamples, StepResult

__all__ = ["Progress"]


class Progress:
    """Timers and counters between two log rows; feeds Prometheus every step."""

    def __init__(self, metrics: WorkerMetrics, world: int, total_steps: int):
        self.metrics, self.world, self.total = metrics, world, total_steps
        self._reset()
        self.t_fetch = self.t_ready = time.perf_counter()

    def _reset(self) -> None:
        self.t0, self.images, self.wait, self.busy = time.perf_counter(), 0, 0.0, 0.0

    def fetching(self) -> None:
        """The loop is about to ask the loader for a batch."""
        self.t_fetch = time.perf_counter()

    def ready(self) -> None:
        """The batch arrived."""
        self.t_ready = time.perf_counter()
        self.wait += self.t_ready - self.t_fetch

    def stepped(self, step: int, images: int) -> None:
        """The optimizer step ended (or was skipped)."""
        t = time.perf_counter()
        self.busy += t - self.t_ready
        self.images += images
        m = self.metrics
        m.step_seconds.observe(t - self.t_fetch)
        m.data_wait_seconds.observe(self.t_ready - self.t_fetch)
        m.images.inc(images)
        m.step.set(step)

    def row(
        self,
        res: StepResult,
        *,
        lr: float,
        kl_weight: float,
        epoch: int,
        skipped_steps: int,
        bad_totals: dict[str, int],
    ) -> dict[str, float]:
        """The MLflow row for this log step; updates the gauges and starts a new window."""
        dt = time.perf_counter() - self.t0
        wait_frac = self.wait / max(self.wait + self.busy, 1e-9)
        out = res.out
        loss = out["loss"].detach().item()
        m = self.metrics
        m.images_per_second.set(self.images / dt)
        m.loss.set(loss)
        m.bits_per_dim.set(float(out["bits_per_dim"]))
        m.data_wait_fraction.set(wait_frac)
        row = {
            "loss": loss,
            "neg_elbo_bits_per_dim": float(out["bits_per_dim"]),
            "rate_bits": float(out["rate_bits"]),
            "distortion_bits": float(out["distortion_bits"]),
            "grad_norm": float(res.grad_norm),
            "lr": lr,
            "images_per_second": self.images * self.world / dt,
            "data_wait_fraction": wait_frac,
            "skipped_steps": skipped_steps,
            **BadSamples.as_metrics(bad_totals),
            "kl_weight": kl_weight,
            "epoch": epoch,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's GPU
            row["gpu_memory_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self._reset()
        return row

    def line(self, row: dict[str, float], step: int) -> str:
        """The driver's progress line for ``row``."""
        return (
            f"epoch {row['epoch']:.0f} step {step}/{self.total} | "
            f"{row['images_per_second']:,.0f} img/s | "
            f"-ELBO {row['neg_elbo_bits_per_dim']:.4f} bits/dim | "
            f"rate {row['rate_bits']:.1f} bits | wait {row['data_wait_fraction']:.0%}"
        )
