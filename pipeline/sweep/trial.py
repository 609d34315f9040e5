"""What runs inside one Ray Tune trial: the point's training job, as ``pipeline train`` runs
it (the same DDP TorchTrainer, data and MLflow tracking), as a child of the sweep's run.

The trial is only a driver: its Ray Train run holds the workers. Its run name and storage
path are the point's, so a retried trial (or a relaunched sweep) resumes the point from its
own last checkpoint, in the same MLflow child run.
"""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.errors import PipelineError
from pipeline.sweep import results
from pipeline.train.config import TrainJob
from pipeline.typed import build

__all__ = ["PARENT_TAG", "EvalReport", "run_point"]

PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting tag


class EvalReport(TuneReportCallback):
    """Hands Tune the epoch-end reports only (those with held-out metrics), under the stable
    names of :data:`pipeline.sweep.results.TERMS`, so schedulers compare like with like."""

    def after_report(self, run_context, metrics, checkpoint):
        terms = results.eval_terms(metrics[0]) if metrics else None
        if terms is None:  # a mid-epoch checkpoint: no held-out numbers yet
            return
        row = {**terms, "epoch": metrics[0].get("epoch", 0), "step": metrics[0].get("step", 0)}
        super().after_report(run_context, [row], checkpoint)


def run_point(config: dict, points: dict) -> None:
    """Tune's trainable: train the point ``config["point"]`` and record its held-out result.

    ``config``: ``point`` (its name), ``parent_run_id``, ``points_url`` (the results record);
    ``points``: name -> ``{"job", "kl_weight", "latent_dim"}``.
    """
    from pipeline.train.driver import run_training

    name = config["point"]
    point = points[name]
    job = build(TrainJob, point["job"])
    res = run_training(
        job,
        register=False,
        tags={PARENT_TAG: config["parent_run_id"]},
        callbacks=[EvalReport()],
    )
    terms = results.eval_terms(res.metrics)
    if terms is None:
        raise PipelineError(f"point {name!r} finished without held-out metrics")
    results.write(
        config["points_url"],
        results.PointResult(
            name=name,
            kl_weight=point["kl_weight"],
            latent_dim=point["latent_dim"],
            status="finished",
            run_id=res.run_id,
            checkpoint_url=res.checkpoint_url,
            epoch=int(res.metrics.get("epoch", 0)),
            step=int(res.metrics.get("step", 0)),
            **terms,
        ),
    )
    print(
        f"point {name}: rate {terms['rate_bits']:.2f} bits, distortion "
        f"{terms['distortion_bits']:.2f} bits, -ELBO {terms['neg_elbo_bits']:.2f} bits",
        flush=True,
    )
