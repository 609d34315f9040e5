"""The sweep driver: one Ray Tune trial per point of the rate-distortion curve.

Each trial runs the training job's DDP TorchTrainer for its point (:mod:`pipeline.sweep.trial`);
Tune starts as many as ``sweep.max_concurrent`` and the cluster's resources allow and queues
the rest. The driver owns the MLflow parent run, redraws the curve (PNG + table) there each
time a trial finishes, and registers the ELBO-optimal point's model with ``sweep.alias``.

Relaunching the same yaml resumes: points with a record under ``{root}/points/`` are not run
again, the others resume from their own checkpoints in their own MLflow child runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from pipeline.errors import PipelineError
from pipeline.sweep import curve, results
from pipeline.sweep.config import Point, SweepJob
from pipeline.sweep.results import PointResult
from pipeline.sweep.trial import PARENT_TAG, run_point
from pipeline.train.tracking import (
    STORE_TAG,
    RunSpec,
    config_params,
    find_or_create_run,
    mlflow_wait,
    public_uri,
    storage_path,
    wait_for_run,
)
from pipeline.typed import to_dict

__all__ = ["SWEEP_TAG", "SweepResult", "run_sweep"]

SWEEP_TAG = "pipeline.sweep"
CURVE_PNG, CURVE_TABLE, CURVE_CSV = "rd_curve.png", "rd_curve.json", "rd_curve.csv"
GALLERY_PNG = "rd_gallery.png"  # a row of prior samples and reconstructions per point


@dataclass
class SweepResult:
    parent_run_id: str
    results: dict[str, PointResult]  # every decided point, by name
    trained: list[str]  # points this launch ran
    skipped: list[str]  # points an earlier launch had decided
    best: PointResult | None
    model_version: str | None = None
    model_uri: str | None = None


def parent_spec(job: SweepJob) -> RunSpec:
    """The sweep's MLflow run: found again by its sweep name and storage path."""
    store = storage_path(job.scaling.storage_path)
    return RunSpec(
        job.tracking.mlflow_uri,
        job.tracking.experiment,
        job.scaling.name,
        {SWEEP_TAG: job.scaling.name, STORE_TAG: store},
        config_params(job),
        system_metrics_interval=0.0,
    )


def publish(job: SweepJob, parent_run_id: str, decided: list[PointResult]) -> None:
    """Log the curve (PNG) and its table into the parent run, replacing earlier versions."""
    from mlflow.tracking import MlflowClient

    if not decided:
        return
    client = MlflowClient(job.tracking.mlflow_uri)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / CURVE_PNG
        curve.draw(decided, png, title=f"{job.scaling.name}: held-out rate-distortion")
        client.log_artifact(parent_run_id, str(png))
    # the whole table each time (mlflow.log_table would append to the earlier rows)
    client.log_text(parent_run_id, json.dumps(curve.table(decided), indent=1), CURVE_TABLE)
    client.log_text(parent_run_id, curve.csv(decided), CURVE_CSV)
    client.set_tag(parent_run_id, "rd.points_decided", str(len(decided)))


def publish_gallery(job: SweepJob, parent_run_id: str, decided: list[PointResult]) -> None:
    """Log the per-point gallery (:mod:`pipeline.sweep.gallery`) into the parent run; a
    failure is a warning: the curve and the models are what the sweep is for."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.gallery import sweep_gallery

    if not decided:
        return
    try:
        png = sweep_gallery(decided, job.data.test_url)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / GALLERY_PNG
            path.write_bytes(png)
            MlflowClient(job.tracking.mlflow_uri).log_artifact(parent_run_id, str(path))
    except Exception as e:
        print(f"warning: no sweep gallery ({type(e).__name__}: {e})", flush=True)


class CurveCallback(tune.Callback):
    """Redraws the parent run's curve each time a trial finishes (on the sweep's driver)."""

    def __init__(self, job: SweepJob, parent_run_id: str):
        self.job, self.parent_run_id = job, parent_run_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            done = results.read_all(results.points_url(self.job.root))
            publish(self.job, self.parent_run_id, list(done.values()))
        except Exception as e:  # the curve must not stop the sweep
            print(f"warning: could not update the curve ({type(e).__name__}: {e})", flush=True)


def scheduler(job: SweepJob):
    """ASHA on the held-out -ELBO at epoch ends, or None (every point runs to the end)."""
    e = job.sweep.early_stop
    if e.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric="neg_elbo_bits",
        mode="min",
        max_t=job.optim.epochs,
        grace_period=e.grace_epochs,
        reduction_factor=e.reduction_factor,
    )


def concurrency(job: SweepJob, cluster: dict[str, float]) -> int:
    """``sweep.max_concurrent``, or (0) as many trials as ``cluster``'s resources fit whole:
    further trials wait in Tune's queue rather than as Train runs waiting for workers."""
    if job.sweep.max_concurrent:
        return job.sweep.max_concurrent
    s = job.scaling
    fit = int(cluster.get("CPU", 0) // (s.num_workers * s.cpus_per_worker + job.sweep.trial_cpus))
    if s.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // (s.num_workers * (s.gpus_per_worker or 1))))
    return max(1, fit)


def _tuner(job: SweepJob, todo: list[Point], parent_run_id: str, at_once: int) -> tune.Tuner:
    s = job.sweep
    points = {
        p.run_name: {
            "job": to_dict(job.train_job(p)),
            "kl_weight": p.kl_weight,
            "latent_dim": p.latent_dim,
        }
        for p in todo
    }
    return tune.Tuner(
        # the points' jobs travel beside the config, so Tune's tables show only the names
        tune.with_resources(tune.with_parameters(run_point, points=points), {"CPU": s.trial_cpus}),
        param_space={
            "point": tune.grid_search([p.run_name for p in todo]),
            "parent_run_id": parent_run_id,
            "points_url": results.points_url(job.root),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=at_once,
            scheduler=scheduler(job),
            trial_name_creator=lambda t: t.config["point"],
            trial_dirname_creator=lambda t: t.config["point"],
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=job.root,
            failure_config=tune.FailureConfig(max_failures=s.trial_max_failures),
            callbacks=[CurveCallback(job, parent_run_id)],
            verbose=1,
        ),
    )


def _record_stopped(job: SweepJob, grid, todo: list[Point], parent_run_id: str) -> None:
    """Points early stopping cut (no error, no record of their own): record their last
    held-out numbers as ``stopped`` and mark their child runs KILLED."""
    from mlflow.tracking import MlflowClient

    url = results.points_url(job.root)
    decided = results.read_all(url)
    by_name = {p.run_name: p for p in todo}
    for res in grid:
        name = (res.config or {}).get("point")
        m = res.metrics or {}
        if name not in by_name or name in decided or res.error or "neg_elbo_bits" not in m:
            continue
        p = by_name[name]
        spec = RunSpec.from_job(job.train_job(p))
        spec.tags[PARENT_TAG] = parent_run_id
        run_id = find_or_create_run(spec, create=False)
        if run_id:
            MlflowClient(job.tracking.mlflow_uri).set_terminated(run_id, status="KILLED")
        terms = {k: m[k] for k in results.TERMS}
        results.write(
            url,
            PointResult(
                name=name,
                kl_weight=p.kl_weight,
                latent_dim=p.latent_dim,
                status="stopped",
                run_id=run_id,
                checkpoint_url="",
                epoch=int(m.get("epoch", 0)),
                step=int(m.get("step", 0)),
                **terms,
            ),
        )
        print(f"point {name}: stopped early at epoch {m.get('epoch')}", flush=True)


def register_best(job: SweepJob, top: PointResult) -> tuple[str, str]:
    """Register ``top``'s final weights (once: a relaunch finds its version by run id) and
    point ``sweep.alias`` at them."""
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from pipeline.train.driver import register_model

    name, alias = job.tracking.registered_model, job.sweep.alias
    client = MlflowClient(job.tracking.mlflow_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
        if mv.tags.get("train_run_id") == top.run_id:
            return str(mv.version), f"models:/{name}@{alias}"
    except Exception:  # no such model or alias yet
        pass
    point = Point(top.kl_weight, top.latent_dim, top.name)
    tj = job.train_job(point)
    tj = dataclasses.replace(tj, tracking=dataclasses.replace(tj.tracking, alias=alias))
    return register_model(tj, top.run_id, Checkpoint(top.checkpoint_url))


def run_sweep(
    job: SweepJob,
    address: str | None = None,
    env_vars: dict[str, str] | None = None,
    register: bool = True,
) -> SweepResult:
    """Run every undecided point of ``job`` on Ray Tune; publish the curve; register the best.

    The best model is the finished point with the lowest held-out -ELBO (rate + distortion
    in bits, at KL weight 1): the point that is the best density model, whatever its beta.
    """
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import ray_address, worker_env
    from pipeline.train.preflight import preflight

    preflight(job.train_job())  # bad data: one line, before any run or trial exists
    url = results.points_url(job.root)
    points = job.points()
    decided = results.read_all(url)
    todo = [p for p in points if p.run_name not in decided]
    skipped = [p.run_name for p in points if p.run_name in decided]
    for name in skipped:
        r = decided[name]
        print(f"point {name}: {r.status} by an earlier launch (run {r.run_id}), skipped")
    spec = parent_spec(job)
    parent = wait_for_run(spec, mlflow_wait())
    if not parent:
        raise PipelineError(f"MLflow at {public_uri(spec.uri)} unreachable: no sweep run")
    print(f"MLflow sweep run {parent}: {len(todo)} point(s) to run", flush=True)
    if todo:
        if not ray.is_initialized():
            env = worker_env(job, env_vars)
            env = {k: v for k, v in env.items() if os.environ.get(k) != v}
            ray.init(
                address=ray_address(address),
                log_to_driver=True,
                runtime_env={"env_vars": env} if env else None,
            )
        # trials keep the driver's working dir (relative data paths resolve as in `train`)
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        at_once = concurrency(job, ray.cluster_resources())
        print(f"running up to {at_once} point(s) at once; Tune queues the rest", flush=True)
        grid = _tuner(job, todo, parent, at_once).fit()
        _record_stopped(job, grid, todo, parent)
        errors = {(r.config or {}).get("point"): r.error for r in grid if r.error}
    else:
        errors = {}
    decided = results.read_all(url)
    publish(job, parent, list(decided.values()))
    publish_gallery(job, parent, list(decided.values()))
    missing = [p.run_name for p in points if p.run_name not in decided]
    client = MlflowClient(job.tracking.mlflow_uri)
    if missing:
        client.set_terminated(parent, status="FAILED")
        first = next(iter(errors.values()), None)
        why = f": {str(first).strip().splitlines()[-1]}" if first else ""
        raise PipelineError(
            f"sweep {job.scaling.name!r}: point(s) {', '.join(missing)} failed{why}; "
            f"relaunch the same yaml to resume them"
        )
    top = results.best(list(decided.values()))
    out = SweepResult(parent, decided, [p.run_name for p in todo], skipped, top)
    if top is not None:
        client.set_tag(parent, "rd.best_point", top.name)
        client.log_metric(parent, "best_neg_elbo_bits", top.neg_elbo_bits)
        if register:
            out.model_version, out.model_uri = register_best(job, top)
    client.set_terminated(parent, status="FINISHED")
    print(
        f"sweep {job.scaling.name}: {len(decided)} points, ELBO-optimal {top.name if top else '-'}"
        + (f" | model {out.model_uri} (version {out.model_version})" if out.model_uri else ""),
        flush=True,
    )
    return out
