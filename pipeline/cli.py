"""The ``pipeline`` command: one entrypoint for every job, locally or on a Ray cluster.

Heavy imports (torch, ray, mlflow) happen inside the subcommands so ``--help`` and
``validate`` stay instant and touch no cluster, server or bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)
_NOT_SECRET = re.compile(r"_(PATH|FILE|DIR|MODE)$", re.IGNORECASE)  # RAY_AUTH_TOKEN_PATH: a path
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the value of every secret-looking environment variable (``SECRET_ENV``
    and any name with SECRET, PASSWORD, TOKEN, CREDENTIAL) and any ``user:password@`` in a
    URL replaced by ``***``."""
    for name, value in os.environ.items():
        secret = name in SECRET_ENV or (_SECRET_NAME.search(name) and not _NOT_SECRET.search(name))
        if secret and value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1***@", text)


def _load(path: str, kind: str | None = None):
    from pipeline.jobs import load_job

    job = load_job(path)
    if kind and job.kind != kind:
        raise PipelineError(f"{path}: kind: expected {kind!r} for this command, got {job.kind!r}")
    return job


def _stack_env() -> None:
    """Client settings of the local stack (``make up``, in ``$PIPELINE_STACK_DIR``, default
    ``.stack``) while it runs, unless the env already has them; a stopped stack's are ignored."""
    try:
        from pipeline.stack import load_stack_env
    except ImportError:  # pragma: no cover - stack module optional on clusters
        return
    load_stack_env(os.environ.get("PIPELINE_STACK_DIR", ".stack"))


# ---------------------------------------------------------------------------- subcommands


def cmd_validate(args) -> int:
    for path in args.files:
        job = _load(path)
        print(f"ok: {path}: {job.kind} job, entrypoint: {job.entrypoint}")
    return 0


def cmd_ingest(args) -> int:
    from pipeline.data.ingest import ingest

    job = _load(args.file, "ingest")
    _stack_env()
    ingest(job.config.ingest)
    return 0


def cmd_train(args) -> int:
    job = _load(args.file, "train")
    _stack_env()
    from pipeline.train.driver import run_training

    config = dataclasses.replace(job.config, tracking=job.config.tracking.resolved())
    if args.name:
        config = dataclasses.replace(
            config, scaling=dataclasses.replace(config.scaling, name=args.name)
        )
    run_training(config, address=args.address, env_vars=job.runtime_env.get("env_vars") or {})
    return 0


def cmd_sweep(args) -> int:
    job = _load(args.file, "sweep")
    _stack_env()
    from pipeline.sweep.driver import run_sweep

    config = dataclasses.replace(job.config, tracking=job.config.tracking.resolved())
    run_sweep(config, address=args.address, env_vars=job.runtime_env.get("env_vars") or {})
    return 0


def cmd_evaluate(args) -> int:
    _stack_env()
    from pipeline.serve.evaluate import main as evaluate_main

    return evaluate_main(args)


def cmd_sample(args) -> int:
    job = _load(args.file, "sample")
    _stack_env()
    from pipeline.serve.gallery import run_sample

    config = dataclasses.replace(job.config, tracking=job.config.tracking.resolved())
    run_sample(config, if_new_version=args.if_new_version)
    return 0


def cmd_submit(args) -> int:
    job = _load(args.file)
    _stack_env()
    from pipeline.submit import submit

    return submit(job, address=args.address, wait=not args.no_wait)


def cmd_stack(args) -> int:
    from pipeline import stack

    state = os.environ.get("PIPELINE_STACK_DIR", ".stack")
    if args.action == "up":
        for name, url, what in stack.up(state):
            print(f"{name:<11} {url:<24} {what}")
        print(f"client settings: {state}/env (credentials: {state}/credentials.env, mode 0600)")
        return 0
    if args.action == "down":
        for name, pids in stack.down(state):
            print(f"{name:<11} stopped {len(pids)} process(es)" + (f": {pids}" if pids else ""))
        return 0
    rows = stack.status(state)
    print(stack.format_status(rows))
    return 0 if rows and all(r[2] for r in rows) else 1


def cmd_bench(args) -> int:
    from pipeline.data import bench

    return bench.main(args.rest)


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline",
        description="Train VAEs on Ray from WebDataset shards on object storage.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add(
        "validate", cmd_validate, "check job yamls (types, keys, values) without touching anything"
    )
    sp.add_argument("files", nargs="+", metavar="FILE")

    sp = add("ingest", cmd_ingest, "ingest an image dataset into WebDataset shards + manifest")
    sp.add_argument("file", metavar="FILE", help="an ingest job yaml, e.g. jobs/ingest.yaml")

    sp = add("train", cmd_train, "train on Ray Train (starts or attaches to a Ray cluster)")
    sp.add_argument("file", metavar="FILE", help="a train job yaml, e.g. jobs/train.yaml")
    sp.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)"
    )
    sp.add_argument(
        "--name",
        default=None,
        help="override scaling.name (a new name starts a new run; the same name resumes)",
    )

    sp = add(
        "sweep",
        cmd_sweep,
        "a rate-distortion sweep: one Ray Tune trial (a Ray Train run) per KL weight",
    )
    sp.add_argument("file", metavar="FILE", help="a sweep job yaml, e.g. jobs/rd-sweep.yaml")
    sp.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)"
    )

    sp = add(
        "evaluate", cmd_evaluate, "ELBO, IWAE-K, bits/dim, PSNR of a checkpoint or registered model"
    )
    sp.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint URL",
    )
    sp.add_argument("--data", required=True, help="a shard folder URL holding manifest.json")
    sp.add_argument("--k", type=int, default=100, help="importance samples for the IWAE bound")
    sp.add_argument("--batches", type=int, default=10, help="batches to evaluate (0: all)")
    sp.add_argument("--batch-size", type=int, default=100)

    sp = add("sample", cmd_sample, "write sample galleries from a registered model (idempotent)")
    sp.add_argument("file", metavar="FILE", help="a sample job yaml, e.g. jobs/sample.yaml")
    sp.add_argument(
        "--if-new-version",
        action="store_true",
        help="do work only if the alias points to a version with no gallery yet",
    )

    sp = add("submit", cmd_submit, "submit a job yaml to a Ray cluster's job server")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument(
        "--address",
        default=None,
        help="job server URL (default: RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    sp.add_argument("--no-wait", action="store_true", help="return after submitting")

    sp = add("stack", cmd_stack, "the local stack: SeaweedFS S3, MLflow, Ray head, Prometheus")
    sp.add_argument("action", choices=["up", "down", "status"])

    sp = add("bench", cmd_bench, "benchmarks (data path)")
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the data benchmark")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except PipelineError as e:
        text = re.sub(r"\s*[\r\n]+\s*", " ", str(e).strip())  # one line, whatever it held
        print(redact(f"error: {text}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
