"""A private S3 (SeaweedFS), MLflow and Ray head for one benchmark run, on free ports.

Started in a short temp dir (Ray's unix socket paths must stay short) and stopped by PID at
the end, also on Ctrl-C / SIGTERM. The client environment (S3 credentials, MLflow URI, Ray
auth) goes into ``os.environ`` before ``ray`` is imported, so ``ray.init``, ingest workers
and DataLoader workers all see it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from pipeline import stack

REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchStack:
    """SeaweedFS + MLflow (artifacts on that S3) + a Ray head (``num_cpus`` logical CPUs)."""

    def __init__(self, num_cpus: int = 4, with_ray: bool = True, with_mlflow: bool = True):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
        self.num_cpus, self.with_ray, self.with_mlflow = num_cpus, with_ray, with_mlflow
        self.s3 = self.mlflow = self.ray = None
        self.started: list[stack.Service] = []
        self.startup_seconds: dict[str, float] = {}
        self._saved_env: dict[str, str | None] = {}

    def _start(self, svc: stack.Service) -> None:
        self.started.append(svc)
        t0 = time.perf_counter()
        svc.start()
        self.startup_seconds[svc.name] = round(time.perf_counter() - t0, 1)

    def _setenv(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def __enter__(self) -> BenchStack:
        try:
            self.s3 = stack.SeaweedFS(
                self.dir,
                access_key="BENCH" + secrets.token_hex(8).upper(),
                secret_key=secrets.token_hex(20),
            )
            self._start(self.s3)
            self._setenv(self.s3.env)
            if self.with_mlflow:
                bucket = self.s3.make_bucket("mlflow")
                self.mlflow = stack.MlflowServer(self.dir, None, f"{bucket}/artifacts", self.s3)
                self._start(self.mlflow)
                self._setenv({"MLFLOW_TRACKING_URI": self.mlflow.uri})
            if self.with_ray:
                # PYTHONPATH: Ray workers import bench.loops (bench/ is not an installed package)
                env = {**self.s3.env, "PYTHONPATH": str(REPO_ROOT)}
                self.ray = stack.RayHead(
                    self.dir, num_cpus=self.num_cpus, env=env, object_store_memory=512 * 2**20
                )
                self._start(self.ray)
                self._setenv({**self.ray.client_env, "PYTHONPATH": str(REPO_ROOT)})
                for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
                    self._saved_env.setdefault(key, os.environ.get(key))
                    os.environ.pop(key, None)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ray_init(self) -> None:
        """Connect this process to the stack's Ray head (once)."""
        import ray
        import ray._private.ray_constants as ray_constants

        # read at `import ray`: without it ray.init rewrites 127.0.0.1 to the host's IP
        ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray reads RAY_AUTH_MODE and the token once per process: re-read os.environ
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        if not ray.is_initialized():
            ray.init(address=self.ray.address, log_to_driver=False)

    def bucket(self, name: str) -> str:
        return self.s3.make_bucket(name)

    def close(self) -> list[int]:
        """Stop every service we started (reverse order); returns the PIDs that were ended."""
        try:
            import sys

            if "ray" in sys.modules:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
        except Exception:
            pass
        stopped: list[int] = []
        while self.started:
            svc = self.started.pop()
            try:
                stopped += svc.stop()
            except stack.ServiceError as e:
                print(f"bench: {e}", flush=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        return stopped
