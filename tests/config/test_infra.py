"""Cluster manifests, checked offline against the schemas their consumers use.

- Standard Kubernetes kinds, and the pod templates inside KubeRay objects: the Kubernetes
  OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown fields are errors).
- KubeRay ``RayCluster``/``RayJob``: no CRD schema ships on PyPI, so their own fields are
  checked against ``KUBERAY_V1``, a transcription of KubeRay's ray.io/v1 Go types
  (ray-operator/apis/ray/v1, KubeRay 1.6+), and the RayCluster is fed through Ray's own
  RayCluster -> autoscaler translation, which validates against Ray's schema.
- ``ray up`` config: Ray's ``prepare_config`` + ``validate_config`` (ray-schema.json).
- Grafana queries: parsed by ``promql-parser``; metric names must be ones the workers export.
- Prometheus scrape config: structural (promtool ships on neither PyPI nor npm).

No cluster, network or server: everything here reads files.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from tests.helpers import ROOT, require

K8S = ROOT / "infra" / "k8s"
DASHBOARD = ROOT / "infra" / "grafana" / "vae-training-dashboard.json"
RAY_UP = ROOT / "infra" / "ray" / "cluster-aws.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
CLUSTER_DOC = ROOT / "docs" / "CLUSTER.md"
K8S_VERSION = "1.30.0"  # oldest Kubernetes minor these manifests target (EKS standard support)
NAMESPACE = "vae"

# The training workers' Prometheus series (pipeline/train/metrics.py), labels run and rank.
WORKER_METRICS = {
    "vae_train_images_per_second",
    "vae_train_loss",
    "vae_train_bits_per_dim",
    "vae_train_data_wait_fraction",
    "vae_train_step",
    "vae_train_images_total",
    "vae_train_skipped_steps_total",
    "vae_train_bad_samples_total",
    "vae_train_step_seconds",
    "vae_train_data_wait_seconds",
    "vae_train_checkpoint_seconds",
}
HISTOGRAMS = {
    "vae_train_step_seconds",
    "vae_train_data_wait_seconds",
    "vae_train_checkpoint_seconds",
}
# Labels the KubeRay operator puts on every Ray pod (utils/constant.go).
KUBERAY_POD_LABELS = {
    "ray.io/cluster",
    "ray.io/node-type",
    "ray.io/group",
    "ray.io/is-ray-node",
    "ray.io/identifier",
}

# ---------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every object the kustomization's resources hold."""
    return [(name, doc) for name in kustomization()["resources"] for doc in load_docs(K8S / name)]


def one(kind: str, name: str | None = None) -> dict:
    found = [
        d
        for _, d in manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def generated_configmaps() -> dict[str, dict[str, str]]:
    out = {}
    for gen in kustomization().get("configMapGenerator", []):
        assert not gen.get("files"), "generator files: see the load-restrictor note"
        out[gen["name"]] = dict(lit.split("=", 1) for lit in gen.get("literals", []))
    return out


def job_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / "jobs" / name).read_text())


def walk(node, path=()):
    """Yield (path, value) for every node of a yaml tree."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def pod_specs(doc: dict) -> list[dict]:
    """The pod specs an object creates (Deployment, StatefulSet, CronJob, KubeRay)."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "RayCluster":
        return [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        return [spec["submitterPodTemplate"]["spec"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for ps in pod_specs(doc) for c in ps.get("initContainers", []) + ps["containers"]]


def k8s_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def dockerfile_workdir(stage: str) -> str:
    text = DOCKERFILE.read_text()
    body = re.split(r"^FROM .*", text, flags=re.M)
    stages = re.findall(r"^FROM .* AS (\S+)", text, flags=re.M)
    workdirs = re.findall(r"^WORKDIR (\S+)", body[1 + stages.index(stage)], flags=re.M)
    return workdirs[-1]


# ---------------------------------------------------------------------------- kustomize


def test_kustomization_references_existing_files_in_one_namespace():
    kust = kustomization()
    assert kust["namespace"] == NAMESPACE
    for name in kust["resources"]:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
        assert load_docs(K8S / name), f"{name} holds no objects"
    assert set(kust["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    namespaces = [d for _, d in manifests() if d["kind"] == "Namespace"]
    assert [d["metadata"]["name"] for d in namespaces] == [NAMESPACE]
    images = {i["name"] for i in kust["images"]}
    used = {c["image"] for _, d in manifests() for c in containers(d)}
    assert images <= used, f"images: entries nothing uses: {images - used}"


def test_kustomize_build_renders_valid_objects():
    require(shutil.which("kubectl"), "kubectl (kustomize) not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(manifests()) + len(generated_configmaps())
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        for c in containers(doc):
            assert c["image"] not in {i["name"] for i in kustomization()["images"]}, (
                f"{doc['kind']}/{doc['metadata']['name']}: image {c['image']} not rewritten"
            )
        if doc["apiVersion"] != "ray.io/v1":
            k8s_validate(doc)


# ---------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize(
    "name,doc",
    [(n, d) for n, d in manifests() if d["apiVersion"] != "ray.io/v1"],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}-{v['metadata']['name']}",
)
def test_standard_objects_match_kubernetes_openapi(name, doc):
    k8s_validate(doc)


def test_schema_check_rejects_a_misspelt_field():
    doc = copy.deepcopy(one("CronJob", "vae-sample"))
    doc["spec"]["concurrencyPolicyy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError, match="concurrencyPolicyy"):
        k8s_validate(doc)


# ---------------------------------------------------------------------------- KubeRay

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_OBJ = {"type": "object"}  # core types validated separately (pod templates) or left opaque
_LIST = {"type": "array"}
_MANAGED_BY = {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}


def _closed(required=(), **props):
    return {
        "type": "object",
        "required": list(required),
        "additionalProperties": False,
        "properties": props,
    }


# ray.io/v1 field names and enums from KubeRay's raycluster_types.go / rayjob_types.go.
KUBERAY_V1 = {
    "$defs": {
        "head": _closed(
            ["template"],
            template=_OBJ,
            headService=_OBJ,
            enableIngress={"type": "boolean"},
            ingressOptions=_OBJ,
            resources=_STR_MAP,
            labels=_STR_MAP,
            rayStartParams=_STR_MAP,
            serviceType={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        ),
        "worker": _closed(
            ["groupName", "template", "minReplicas", "maxReplicas"],
            suspend={"type": "boolean"},
            groupName={"type": "string", "minLength": 1},
            replicas=_INT32,
            minReplicas=_INT32,
            maxReplicas=_INT32,
            idleTimeoutSeconds=_INT32,
            priority=_INT32,
            resources=_STR_MAP,
            labels=_STR_MAP,
            rayStartParams=_STR_MAP,
            template=_OBJ,
            scaleStrategy=_OBJ,
            numOfHosts=_INT32,
        ),
        "cluster": _closed(
            ["headGroupSpec"],
            upgradeStrategy=_OBJ,
            authOptions=_closed(
                mode={"enum": ["disabled", "token"]},
                secretName={"type": "string"},
                enableK8sTokenAuth={"type": "boolean"},
            ),
            suspend={"type": "boolean"},
            managedBy=_MANAGED_BY,
            autoscalerOptions=_closed(
                resources=_OBJ,
                image={"type": "string"},
                imagePullPolicy={"type": "string"},
                securityContext=_OBJ,
                idleTimeoutSeconds=_INT32,
                upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
                version={"enum": ["v1", "v2"]},
                env=_LIST,
                envFrom=_LIST,
                volumeMounts=_LIST,
                command=_LIST,
                args=_LIST,
            ),
            headServiceAnnotations=_STR_MAP,
            enableInTreeAutoscaling={"type": "boolean"},
            gcsFaultToleranceOptions=_OBJ,
            historyServerOptions=_OBJ,
            networkPolicy=_OBJ,
            tlsOptions=_OBJ,
            headGroupSpec={"$ref": "#/$defs/head"},
            rayVersion={"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
            workerGroupSpecs={"type": "array", "items": {"$ref": "#/$defs/worker"}},
        ),
        "job": _closed(
            activeDeadlineSeconds=_INT32,
            backoffLimit=_INT32,
            rayClusterSpec={"$ref": "#/$defs/cluster"},
            submitterPodTemplate=_OBJ,
            metadata=_STR_MAP,
            clusterSelector=_STR_MAP,
            submitterConfig=_closed(backoffLimit=_INT32),
            managedBy=_MANAGED_BY,
            deletionStrategy=_OBJ,
            entrypoint={"type": "string"},
            runtimeEnvYAML={"type": "string"},
            jobId={"type": "string"},
            submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            entrypointResources={"type": "string"},
            entrypointNumCpus={"type": "number"},
            entrypointNumGpus={"type": "number"},
            ttlSecondsAfterFinished=_INT32,
            shutdownAfterJobFinishes={"type": "boolean"},
            suspend={"type": "boolean"},
        ),
    },
}
KUBERAY_SPEC = {"RayCluster": "cluster", "RayJob": "job"}


def kuberay_validate(doc: dict) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    schema = {
        **KUBERAY_V1,
        **_closed(
            ["apiVersion", "kind", "metadata", "spec"],
            apiVersion={"const": "ray.io/v1"},
            kind={"const": doc["kind"]},
            metadata=_OBJ,
            spec={"$ref": f"#/$defs/{KUBERAY_SPEC[doc['kind']]}"},
        ),
    }
    jsonschema.Draft202012Validator(schema).validate(doc)
    # metadata is a core ObjectMeta; so is every pod template.
    k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    spec = doc["spec"]
    specs = [spec, spec.get("rayClusterSpec")] if doc["kind"] == "RayJob" else [spec]
    templates = [
        g["template"]
        for s in specs
        if s
        for g in [s.get("headGroupSpec"), *s.get("workerGroupSpecs", [])]
        if g
    ]
    templates += [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []
    for t in templates:
        k8s_validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "template"},
                "template": t,
            }
        )


@pytest.mark.parametrize("kind", sorted(KUBERAY_SPEC))
def test_kuberay_objects_match_v1_api(kind):
    kuberay_validate(one(kind))


def test_kuberay_check_rejects_unknown_fields():
    rc = copy.deepcopy(one("RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        kuberay_validate(rc)
    rc = copy.deepcopy(one("RayCluster"))
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kuberay_validate(rc)


def test_raycluster_shape_as_the_ray_autoscaler_reads_it():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    rc = copy.deepcopy(one("RayCluster"))
    rc["metadata"]["namespace"] = NAMESPACE
    config = _derive_autoscaling_config_from_ray_cr(rc)  # runs Ray's validate_config too
    types = config["available_node_types"]
    head = types.pop("headgroup")
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    (gpu,) = types.values()
    assert gpu["resources"]["GPU"] == 1, "one GPU per pod: one DDP rank per pod"
    assert gpu["resources"]["CPU"] >= 4, "decoding needs several cores per GPU"
    assert gpu["max_workers"] >= 2
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert worker["containers"][0]["resources"]["requests"] == limits
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        worker["tolerations"]
    )


def test_raycluster_auth_token_and_service_accounts():
    rc = one("RayCluster")
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
    accounts = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "ServiceAccount"}
    for _, doc in manifests():
        for ps in pod_specs(doc):
            if "serviceAccountName" in ps:
                assert ps["serviceAccountName"] in accounts, ps["serviceAccountName"]
    for ps in pod_specs(rc):
        sa = accounts[ps["serviceAccountName"]]
        assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"], "IRSA for S3"


def test_head_runs_drivers_where_the_image_keeps_the_job_yamls():
    workdir = dockerfile_workdir("pipeline")
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*\bjobs \./jobs$", text, flags=re.M), "image must ship jobs/"
    head = one("RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["workingDir"] == workdir
    (submit,) = containers(one("CronJob"))
    assert submit["workingDir"] == workdir
    assert one("RayCluster")["spec"]["rayVersion"] in text, "image and rayVersion must agree"


# ---------------------------------------------------------------------------- jobs


def test_rayjob_runs_train_gpu_yaml_entrypoint_on_the_raycluster():
    job = one("RayJob")
    assert job["spec"]["entrypoint"] == job_yaml("train-gpu.yaml")["entrypoint"]
    rc = one("RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert not job["spec"].get("shutdownAfterJobFinishes"), "the cluster is shared"


def test_cronjob_submits_sample_yaml_entrypoint_if_new_version():
    cron = one("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = containers(cron)
    command = [*c.get("command", []), *c.get("args", [])]
    split = command.index("--")
    head_svc = f"http://{one('RayCluster')['metadata']['name']}-head-svc:8265"
    assert command[:3] == ["ray", "job", "submit"] and f"--address={head_svc}" in command[:split]
    assert command[split + 1 :] == [
        *shlex.split(job_yaml("sample.yaml")["entrypoint"]),
        "--if-new-version",
    ]


def _config_values(tree) -> set[str]:
    return {v for _, v in walk(tree) if isinstance(v, str) and len(v) > 3}


@pytest.mark.parametrize(
    "kind,job_file", [("RayJob", "train-gpu.yaml"), ("CronJob", "sample.yaml")]
)
def test_jobs_repeat_nothing_from_the_job_yaml(kind, job_file):
    spec = job_yaml(job_file)
    doc = one(kind)
    if kind == "RayJob":
        # The entrypoint only: no runtime env, cluster template, submitter or metadata copies.
        assert set(doc["spec"]) <= {
            "entrypoint",
            "clusterSelector",
            "submissionMode",
            "submitterConfig",
            "activeDeadlineSeconds",
        }
    env = [e for c in containers(doc) for e in c.get("env", [])]
    repeated_env = {e["name"] for e in env} & set(spec["runtime_env"].get("env_vars", {}))
    assert not repeated_env, f"{kind} repeats runtime_env.env_vars {repeated_env}"
    assert all(e["name"].startswith("RAY_AUTH_") for e in env), "only the Ray token"
    values = _config_values(doc) - {spec["entrypoint"]}
    repeated = values & _config_values(spec["config"])
    assert not repeated, f"{kind} repeats config values of jobs/{job_file}: {repeated}"


# ---------------------------------------------------------------------------- secrets

SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|DSN", re.I)


def _all_texts() -> dict[str, str]:
    paths = [*K8S.glob("*.yaml"), RAY_UP, DOCKERFILE, DASHBOARD]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_no_secret_values_in_any_manifest():
    for name, text in _all_texts().items():
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{name}: AWS key id"
        assert "aws_secret_access_key" not in text.lower(), name
        assert not re.search(r"postgres(ql)?://[^/@\s:]+:[^@\s]+@", text), f"{name}: DSN password"
    for _, doc in manifests():
        assert doc["kind"] != "Secret", "Secrets are created out of band (docs/CLUSTER.md)"
        for c in containers(doc):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "valueFrom" in e and "value" not in e, (
                        f"{doc['metadata']['name']}: {e['name']} must come from a Secret"
                    )
    ray_up = yaml.safe_load(RAY_UP.read_text())
    for _, v in walk(ray_up):
        if isinstance(v, str):
            assert not re.search(r"AWS_(SECRET_)?ACCESS_KEY|MLFLOW_TRACKING_PASSWORD=", v), v


def _documented_secrets() -> dict[str, set[str]]:
    text = CLUSTER_DOC.read_text().replace("\\\n", " ")
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"create secret generic ([a-z0-9-]+)([^\n]*)", text):
        out.setdefault(m[1], set()).update(re.findall(r"--from-literal=([\w.-]+)=", m[2]))
    return out


def test_every_referenced_secret_key_is_created_in_the_docs():
    documented = _documented_secrets()
    refs = {("ray-auth-token", "auth_token")}  # authOptions.secretName: KubeRay reads this key
    assert one("RayCluster")["spec"]["authOptions"]["secretName"] == "ray-auth-token"
    optional = set()
    for _, doc in manifests():
        for c in containers(doc):
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    refs.add((ref["name"], ref["key"]))
            for src in c.get("envFrom", []):
                if ref := src.get("secretRef"):
                    assert ref.get("optional"), f"envFrom secret {ref['name']} must be optional"
                    optional.add(ref["name"])
    for name, key in sorted(refs):
        assert key in documented.get(name, set()), (
            f"docs/CLUSTER.md must create secret {name} with key {key}"
        )
    assert optional <= set(documented), f"document optional secrets {optional - set(documented)}"


def test_configmap_references_resolve():
    maps = {
        d["metadata"]["name"]: d.get("data", {}) for _, d in manifests() if d["kind"] == "ConfigMap"
    }
    maps.update(generated_configmaps())
    for _, doc in manifests():
        for c in containers(doc):
            for src in c.get("envFrom", []):
                if ref := src.get("configMapRef"):
                    assert ref["name"] in maps, ref["name"]
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("configMapKeyRef"):
                    assert ref["key"] in maps[ref["name"]], f"{ref['name']}: no key {ref['key']}"
        for ps in pod_specs(doc):
            for vol in ps.get("volumes", []):
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in maps, vol["configMap"]["name"]


# ---------------------------------------------------------------------------- MLflow


def _args(container: dict) -> dict[str, str | None]:
    """``--flag=value`` / ``--flag value`` / ``--flag`` -> {flag: value or None}."""
    out: dict[str, str | None] = {}
    argv = [*container.get("command", []), *container.get("args", [])]
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[flag] = value if eq else (nxt if nxt and not nxt.startswith("-") else None)
    return out


def test_mlflow_uses_postgres_s3_artifacts_and_basic_auth():
    (server,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    args = _args(server)
    assert server["command"][:2] == ["mlflow", "server"]
    assert args["--app-name"] == "basic-auth"
    backend = urlsplit(args["--backend-store-uri"])
    assert backend.scheme == "postgresql" and backend.username and backend.password is None
    env = {e["name"]: e for e in server["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    dest = args["--artifacts-destination"]
    var = re.fullmatch(r"\$\((\w+)\)", dest)
    ref = env[var[1]]["valueFrom"]["configMapKeyRef"] if var else None
    dest = generated_configmaps()[ref["name"]][ref["key"]] if ref else dest
    assert dest.startswith("s3://"), dest
    ini = one("ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    auth_db = urlsplit(re.search(r"^database_uri = (\S+)$", ini, flags=re.M)[1])
    assert auth_db.scheme == "postgresql" and auth_db.password is None
    assert auth_db.hostname == backend.hostname, "users live in the tracking database"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith("/basic_auth.ini")
    postgres = one("StatefulSet", "mlflow-postgres")["spec"]
    assert backend.hostname == postgres["serviceName"]
    assert one("Service", backend.hostname)["spec"]["ports"][0]["port"] == backend.port
    tracking = generated_configmaps()["vae-env"]["MLFLOW_TRACKING_URI"]
    svc = one("Service", "mlflow")
    assert tracking == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    host_header = urlsplit(tracking).netloc  # what in-cluster clients send
    assert any(
        fnmatch.fnmatch(host_header, h) if "*" in h else h == host_header
        for h in args["--allowed-hosts"].split(",")
    ), f"{host_header} not allowed"


# ---------------------------------------------------------------------------- Prometheus

SCRAPE_KEYS = {
    "job_name",
    "scrape_interval",
    "scrape_timeout",
    "metrics_path",
    "scheme",
    "honor_labels",
    "kubernetes_sd_configs",
    "static_configs",
    "file_sd_configs",
    "relabel_configs",
    "metric_relabel_configs",
    "params",
    "authorization",
    "tls_config",
    "sample_limit",
}
RELABEL_KEYS = {
    "source_labels",
    "separator",
    "regex",
    "modulus",
    "target_label",
    "replacement",
    "action",
}
RELABEL_ACTIONS = {
    "replace",
    "keep",
    "drop",
    "keepequal",
    "dropequal",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
}


def _meta_label(k8s_label: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k8s_label)


def test_prometheus_scrapes_ray_nodes_and_training_workers():
    config = yaml.safe_load(one("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    assert set(config) <= {"global", "scrape_configs", "rule_files", "alerting"}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"ray", "vae-train"}
    ray_ports = {p["name"] for c in containers(one("RayCluster")) for p in c.get("ports", [])}
    known_meta = {_meta_label(lbl) for lbl in KUBERAY_POD_LABELS} | {
        "__meta_kubernetes_pod_container_port_name",
        "__meta_kubernetes_pod_name",
    }
    for name, job in jobs.items():
        assert set(job) <= SCRAPE_KEYS, f"{name}: unknown keys {set(job) - SCRAPE_KEYS}"
        assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
        kept_ports = None
        for rule in job["relabel_configs"]:
            assert set(rule) <= RELABEL_KEYS and rule.get("action", "replace") in RELABEL_ACTIONS
            assert set(rule["source_labels"]) <= known_meta, rule["source_labels"]
            re.compile(rule.get("regex", "(.*)"))
            if rule["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]:
                kept_ports = set(rule["regex"].split("|"))
        assert kept_ports and kept_ports <= ray_ports, f"{name}: ports {kept_ports} not on Ray pods"
    workers = one("RayCluster")["spec"]["workerGroupSpecs"]
    assert all(
        "vae-metrics" in {p["name"] for p in g["template"]["spec"]["containers"][0]["ports"]}
        for g in workers
    ), "every GPU worker exposes the training metrics port"
    (rule,) = one("Role", "prometheus-discovery")["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    (prom,) = one("Deployment", "prometheus")["spec"]["template"]["spec"]["containers"]
    config_dir = str(Path(_args(prom)["--config.file"]).parent)
    assert any(m["mountPath"] == config_dir for m in prom["volumeMounts"])


# ---------------------------------------------------------------------------- Grafana


def test_worker_metric_names_are_what_the_workers_export():
    from pipeline.train.metrics import WorkerMetrics

    registry = WorkerMetrics("run", 0, port=-1).registry
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}
    assert exported == WORKER_METRICS
    assert {f.name for f in registry.collect() if f.type == "histogram"} == HISTOGRAMS


def _series() -> set[str]:
    counters = {m for m in WORKER_METRICS if m.endswith("_total")}
    hist = {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    return (WORKER_METRICS - HISTOGRAMS) | hist | counters


GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$run": ".*"}


def _queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def _parse(expr: str):
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return promql_parser.parse(expr)


def _selectors(node) -> list:
    found = []
    promql_parser.walk(
        node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None
    )
    return found


def test_dashboard_queries_parse_and_name_only_exported_metrics():
    series, used = _series(), set()
    for title, expr in _queries():
        ast = _parse(expr)  # raises on a PromQL syntax error
        for sel in _selectors(ast):
            assert sel.name in series, f"{title}: unknown metric {sel.name}"
            labels = {m.name for m in sel.matchers.matchers}
            assert "run" in labels, f"{title}: {sel.name} not filtered by $run"
            used.add(re.sub(r"_(bucket|sum|count)$", "", sel.name))

        def check(node, title=title):
            if isinstance(node, promql_parser.Call):
                fn = node.func.name
                inner = [s.name for a in node.args for s in _selectors(a)]
                if fn in ("rate", "increase", "irate"):
                    assert all(re.search(r"_(total|bucket|sum|count)$", n) for n in inner), (
                        f"{title}: {fn}() over a gauge {inner}"
                    )
                if fn == "histogram_quantile":
                    agg = node.args[1]
                    assert isinstance(agg, promql_parser.AggregateExpr)
                    assert "le" in agg.modifier.labels, f"{title}: quantile without `le`"
                    assert all(n.endswith("_bucket") for n in inner)

        promql_parser.walk(ast, check)
    assert used == WORKER_METRICS, f"metrics without a panel: {WORKER_METRICS - used}"


def test_dashboard_check_catches_a_typo():
    ast = _parse('sum by (run) (rate(vae_train_image_total{run=~"$run"}[$__rate_interval]))')
    assert [s.name for s in _selectors(ast)] == ["vae_train_image_total"]
    assert "vae_train_image_total" not in _series()
    with pytest.raises(ValueError):
        _parse("sum(rate(vae_train_images_total[1m])")


def test_dashboard_layout_and_required_panels():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and 1 <= len(dash["uid"]) <= 40
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        assert p["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in (
        "throughput per rank",
        "throughput total",
        "data wait",
        "loss",
        "bits per dim",
        "skipped",
        "bad samples",
        "p50 / p95",
        "checkpoint",
    ):
        assert needed in titles, f"missing a {needed!r} panel"
    quantiles = {
        q
        for _, e in _queries()
        if "vae_train_step_seconds_bucket" in e
        for q in re.findall(r"histogram_quantile\((0\.\d+),", e)
    }
    assert quantiles == {"0.5", "0.95"}


# ---------------------------------------------------------------------------- ray up


def test_ray_up_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(RAY_UP.read_text())
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before touching AWS
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["resources"] == {"CPU": 8, "GPU": 1}
    assert gpu[0]["max_workers"] <= config["max_workers"]
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert raw["file_mounts"]["/home/ray/vae-pipeline"] == "."
    setup = " && ".join(raw["setup_commands"])
    assert "torch==" in setup and "pip install -q -e /home/ray/vae-pipeline" in setup
    ray_pin = re.search(r"ray\[default,train\]==([\d.]+)", setup)[1]
    assert raw["docker"]["image"] == f"rayproject/ray:{ray_pin}-py311-gpu"
    assert ray_pin == one("RayCluster")["spec"]["rayVersion"], "one Ray version everywhere"
    for cmd in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "cluster.env" in cmd


def test_ray_up_schema_rejects_a_bad_node_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(RAY_UP.read_text())
    raw["available_node_types"]["gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


# ---------------------------------------------------------------------------- docs


def test_cluster_doc_gives_the_commands_that_match_these_files():
    text = CLUSTER_DOC.read_text()
    for command in (
        "make up",
        "kubectl apply -f infra/k8s/namespace.yaml",
        "kubectl apply -k infra/k8s",
        "ray up infra/ray/cluster-aws.yaml",
        "ray job submit --address",
        "--working-dir .",
        job_yaml("train.yaml")["entrypoint"],
        "docker build -f infra/docker/Dockerfile",
        "optim.precision: auto",
    ):
        assert command in text, f"docs/CLUSTER.md lacks {command!r}"


def test_cluster_sizing_table_is_the_recorded_gpu_run():
    """Every sizing row in docs/CLUSTER.md is a row of the recorded ``bench.gpu_device`` run
    (bench/gpu/gpu_device.json): nothing in the table is typed in by hand."""
    import json
    import re

    text = CLUSTER_DOC.read_text()
    run = json.loads((CLUSTER_DOC.parents[1] / "bench/gpu/gpu_device.json").read_text())
    rows = re.findall(
        r"^\| `(64|256)`[^|]* \| (\d+) \| (bf16|fp32) \| ([\d,]+) \| ([\d,]+)-([\d,]+) \| "
        r"([\d.]+) GiB \|$",
        text,
        re.M,
    )
    assert len(rows) == len(run["sizing"]) == 10
    num = lambda s: float(s.replace(",", ""))  # noqa: E731
    for (preset, batch, prec, ips, lo, hi, gib), r in zip(rows, run["sizing"], strict=True):
        assert (preset, int(batch), prec) == (r["preset"], r["batch"], r["precision"])
        assert num(ips) == round(r["images_per_s"])
        assert (num(lo), num(hi)) == tuple(round(x) for x in r["spread"])
        assert float(gib) == r["peak_gib"]
    assert run["device"] == "NVIDIA H200" and run["cuda"]
    assert {c["status"] for c in run["checks"]} == {"PASS"}
