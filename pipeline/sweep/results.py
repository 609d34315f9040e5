"""The sweep's record of decided points: one small JSON per point under ``{root}/points/``.

A point's trial writes its record when its training finished (the sweep driver writes one
for a point early stopping cut); a relaunched sweep skips every point that has one. Records
hold the point's held-out rate and distortion, so the curve is redrawn without MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from pipeline import storage

__all__ = ["PointResult", "best", "eval_terms", "points_url", "read_all", "write"]

TERMS = ("rate_bits", "distortion_bits", "neg_elbo_bits", "bits_per_dim")


def points_url(root: str) -> str:
    return storage.join(root, "points")


def eval_terms(metrics: dict) -> dict[str, float] | None:
    """The held-out ELBO terms in a Ray Train report (rank 0's, at an epoch end), whichever
    way the worker loop names them (``eval/rate_bits`` or ``eval_rate_bits``); None if the
    report has none (a mid-epoch checkpoint)."""
    out = {}
    for k in TERMS:
        for key in (f"eval/{k}", f"eval_{k}"):
            if key in metrics:
                out[k] = float(metrics[key])
                break
        else:
            return None
    return out


@dataclass
class PointResult:
    """A decided point. ``neg_elbo_bits`` = ``rate_bits`` + ``distortion_bits`` per image,
    measured at KL weight 1 whatever the point trained with: the points are comparable."""

    name: str
    kl_weight: float
    latent_dim: int
    status: str  # "finished", or "stopped" (early stopping)
    run_id: str  # its MLflow child run
    checkpoint_url: str
    rate_bits: float
    distortion_bits: float
    neg_elbo_bits: float
    bits_per_dim: float
    epoch: int = 0
    step: int = 0
    decided_at: float = 0.0

    def row(self) -> dict:
        return dataclasses.asdict(self)


def write(url: str, result: PointResult) -> None:
    """Record ``result`` under the points folder ``url`` (atomically: readers never see half)."""
    result.decided_at = result.decided_at or time.time()
    data = json.dumps(result.row(), indent=1).encode()
    storage.put_atomic(storage.join(url, f"{result.name}.json"), data)


def read_all(url: str) -> dict[str, PointResult]:
    """Every recorded point under ``url`` by name; empty if none yet."""
    out = {}
    for name in storage.listdir(url):
        if name.endswith(".json") and not name.startswith("."):
            row = json.loads(storage.read_bytes(storage.join(url, name)))
            out[row["name"]] = PointResult(**row)
    return out


def best(results: list[PointResult]) -> PointResult | None:
    """The ELBO-optimal point: the lowest held-out -ELBO (rate + distortion at weight 1) among
    the finished ones; None if none finished."""
    done = [r for r in results if r.status == "finished"]
    return min(done, key=lambda r: r.neg_elbo_bits) if done else None
