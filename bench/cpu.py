"""Where the CPU goes during a run: CPU seconds per process group of our own services.

A background thread polls ``cpu_times`` of this process and of every process of the
benchmark's services (found by their marker, :meth:`pipeline.services.Service.processes`)
once a second; processes that come and go in between (Ray workers, DataLoader workers) are
counted up to their last poll.
"""

from __future__ import annotations

import os
import threading

from pipeline.stack import psutil


def _group(proc) -> str:
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline()[:4])
    except Exception:
        return "gone"
    if proc.pid == os.getpid():
        return "bench driver (this process)"
    if "RayTrainWorker" in name or "RayTrainWorker" in cmd:
        return "Ray Train worker (training loop)"
    if "forkserver" in cmd or "multiprocessing" in cmd:
        return "DataLoader workers"
    if name.startswith("ray::"):
        return "other Ray actors (controller, ...)"
    if "raylet" in name or "gcs_server" in name:
        return "raylet + GCS"
    if "mlflow" in cmd or "uvicorn" in cmd:
        return "MLflow server"
    if "weed" in name:
        return "SeaweedFS"
    return "Ray dashboard, agents, log monitor"


class CpuMeter:
    """``with CpuMeter(services) as m: ...``; then ``m.seconds`` (group -> CPU seconds)."""

    def __init__(self, services: list, interval: float = 1.0):
        self.services, self.interval = services, interval
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()

    def _poll(self) -> None:
        ps = psutil()
        procs = [ps.Process(os.getpid())]
        for svc in self.services:
            try:
                procs += svc.processes()
            except Exception:
                continue
        for p in procs:
            try:
                t = p.cpu_times()
                used = t.user + t.system
            except ps.Error:
                continue
            if p.pid not in self.last:
                self.first[p.pid] = 0.0 if self._started else used
            try:  # the latest name: Ray workers start as `python`, then retitle themselves
                self.names[p.pid] = p.name()
            except ps.Error:
                self.names.setdefault(p.pid, "?")
            group = _group(p)
            if group == "gone":
                group = self.last.get(p.pid, ("gone",))[0]
            self.last[p.pid] = (group, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> CpuMeter:
        self._started = False
        self._poll()
        self._started = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        seconds: dict[str, float] = {}
        by_name: dict[str, float] = {}
        for pid, (group, used) in self.last.items():
            base = self.first.get(pid, 0.0)
            seconds[group] = seconds.get(group, 0.0) + used - base
            by_name[self.names[pid]] = by_name.get(self.names[pid], 0.0) + used - base

        def ordered(d: dict[str, float]) -> dict[str, float]:
            return {
                k: round(v, 1)
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])
                if round(v, 1) > 0
            }

        self.seconds, self.by_name = ordered(seconds), ordered(by_name)
