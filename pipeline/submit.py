"""Submit a job yaml to a Ray cluster's job server, exactly as ``ray job submit`` would."""

from __future__ import annotations

import os
import sys
import time

from pipeline.errors import PipelineError, first_line
from pipeline.jobs import JobSpec

# Never shipped to the cluster: keeps the upload under Ray's 100 MiB working_dir cap.
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    ".stack",
    ".cache",
    ".data",
    "/data",
    "mlruns",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "/bench/results*",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def runtime_env_for(job: JobSpec) -> dict:
    """The job's runtime env, with the working dir and the excludes every upload needs."""
    env = dict(job.runtime_env)
    env.setdefault("working_dir", ".")
    env["excludes"] = sorted(set(env.get("excludes", [])) | set(DEFAULT_EXCLUDES))
    return env


def submit(job: JobSpec, address: str | None = None, wait: bool = True, poll: float = 1.0) -> int:
    """Submit ``job``; stream its logs until it ends. Returns 0 if it succeeded, else 1."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if not address.startswith(("http://", "https://")):
        address = "http://" + address.split("://")[-1].rsplit(":", 1)[0] + ":8265"
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth refused, version mismatch
        raise PipelineError(
            f"cannot reach the Ray job server at {address}: {first_line(e)}"
        ) from None
    job_id = client.submit_job(entrypoint=job.entrypoint, runtime_env=runtime_env_for(job))
    print(f"submitted {job.path or job.kind} as {job_id} to {address}", flush=True)
    if not wait:
        return 0
    seen = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            sys.stdout.write(logs[seen:])
            sys.stdout.flush()
            seen = len(logs)
        if status in TERMINAL:
            break
        time.sleep(poll)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
