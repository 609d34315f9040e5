"""jobs/train-gpu.yaml against the clusters that run it: the KubeRay RayJob names it, it
validates, its ranks fit the GPU worker groups (KubeRay and `ray up`), and the workers'
metrics port is the one the cluster's Prometheus scrapes. Reads files only."""

from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path

import yaml

from pipeline import cli
from pipeline.jobs import load_job
from pipeline.model import PRESETS, preset
from pipeline.typed import to_dict

ROOT = Path(__file__).resolve().parents[2]
GPU_JOB = ROOT / "jobs" / "train-gpu.yaml"
K8S = ROOT / "infra" / "k8s"


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in k8s_docs(name) if d["kind"] == kind]
    return doc


def gpu_group() -> dict:
    """The RayCluster's worker group with GPUs (its one container's spec)."""
    groups = one("raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
    (group,) = [g for g in groups if "nvidia.com/gpu" in container(g)["resources"]["limits"]]
    return group


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def test_rayjob_runs_the_gpu_job_and_it_validates(capsys):
    entry = one("rayjob-train.yaml", "RayJob")["spec"]["entrypoint"]
    assert shlex.split(entry) == ["python", "-m", "pipeline", "train", "jobs/train-gpu.yaml"]
    assert (ROOT / shlex.split(entry)[-1]) == GPU_JOB
    assert cli.main(["validate", str(GPU_JOB)]) == 0
    out = capsys.readouterr().out
    assert out == f"ok: {GPU_JOB}: train job, entrypoint: {entry}\n"
    assert load_job(GPU_JOB).entrypoint == entry


def test_gpu_job_trains_the_64x64_rgb_preset_on_gpus():
    job = load_job(GPU_JOB).config
    assert to_dict(job)["model"] == to_dict(preset("64"))
    assert PRESETS["64"]["image_size"] == 64 and PRESETS["64"]["in_channels"] == 3
    s = job.scaling
    assert s.use_gpu and s.gpus_per_worker == 1
    assert job.optim.ema_decay > 0


def test_gpu_ranks_fit_the_kuberay_worker_group():
    s, data = (job := load_job(GPU_JOB).config).scaling, job.data
    group = gpu_group()
    res = container(group)["resources"]
    assert res["requests"] == res["limits"]
    assert int(res["limits"]["nvidia.com/gpu"]) == s.gpus_per_worker == 1  # a rank per pod
    assert float(res["limits"]["cpu"]) == s.cpus_per_worker
    assert data.num_workers == s.cpus_per_worker - 1  # one core stays with the rank
    assert group["replicas"] == s.num_workers <= group["maxReplicas"]


def test_gpu_ranks_fit_the_ray_up_gpu_nodes():
    s = load_job(GPU_JOB).config.scaling
    raw = yaml.safe_load((ROOT / "infra" / "ray" / "cluster-aws.yaml").read_text())
    (gpu,) = [t for t in raw["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu["resources"] == {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker}
    assert s.num_workers <= gpu["max_workers"]
    assert "jobs/train-gpu.yaml" in (ROOT / "infra" / "ray" / "cluster-aws.yaml").read_text()


def scraped_port_names() -> set[str]:
    """The container port names the k8s Prometheus keeps for the training workers."""
    config = yaml.safe_load(one("prometheus.yaml", "ConfigMap")["data"]["prometheus.yml"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vae-train"]
    (rule,) = [
        r
        for r in job["relabel_configs"]
        if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    ]
    assert rule["action"] == "keep"
    return set(rule["regex"].split("|"))


def test_workers_serve_metrics_on_the_port_the_cluster_prometheus_scrapes():
    tracking = load_job(GPU_JOB).config.tracking
    ports = {p["name"]: p["containerPort"] for p in container(gpu_group())["ports"]}
    scraped = {ports[name] for name in scraped_port_names() if name in ports}
    gpus_per_pod = int(container(gpu_group())["resources"]["limits"]["nvidia.com/gpu"])
    # local rank r serves metrics_port + r (pipeline.train.loop.open_metrics)
    assert {tracking.metrics_port + r for r in range(gpus_per_pod)} == scraped == {9400}
    assert ipaddress.ip_address(tracking.metrics_host).is_unspecified  # the pod IP answers
    assert tracking.metrics_sd_dir == ""


def test_local_job_keeps_metrics_on_loopback():
    tracking = load_job(ROOT / "jobs" / "train.yaml").config.tracking
    assert ipaddress.ip_address(tracking.metrics_host).is_loopback
    assert tracking.metrics_port == 0  # a free port per worker, announced through file_sd


def test_gpu_job_performance_settings():
    spec = load_job(GPU_JOB)
    o, s = spec.config.optim, spec.config.scaling
    assert o.precision == "auto" and not o.compile  # bf16 on the GPU, fp16 only when asked
    assert 0 < s.collective_timeout_s <= 1800
    assert spec.runtime_env["env_vars"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
