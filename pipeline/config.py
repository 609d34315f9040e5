"""Job specs: yaml -> typed dataclasses, one per concern, validated before anything runs.

A job yaml holds what to run (``entrypoint``), how Ray ships it (``runtime_env``) and the
job's ``config``. Config flows one way: yaml -> dataclasses on the driver -> ``asdict()``
handed to workers -> rebuilt with :func:`build`. Every error is one line naming the file,
the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig

# ---------------------------------------------------------------------------- generic loader


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (lists -> tuples where asked)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_coerce(args[0], v, f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly.

    Unknown keys, missing required keys and wrong types raise :class:`ConfigError` with the
    dotted key; ``__post_init__`` checks of impossible values are re-keyed under ``prefix``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in data:
        if k not in fields:
            raise ConfigError(
                join(str(k)), f"unknown key (expected one of: {', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], join(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(join(name), f"missing required key (expected {_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.within(prefix) from None


def to_dict(obj: Any) -> dict:
    """``asdict`` that turns tuples into lists, so the result round-trips through yaml/json."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the form logged as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------- concerns


@dataclass
class ScalingConfig:
    """Where the training runs: Ray Train ScalingConfig/RunConfig/FailureConfig values."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_path: str = ".data/ray_results"
    name: str = "vae"
    max_failures: int = 2
    controller_failure_limit: int = 3  # e.g. a node that never returns: fail, don't hang
    num_to_keep: int = 2

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError("num_workers", f"must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError("gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.controller_failure_limit < -1:
            raise ConfigError("controller_failure_limit",
                              f"must be >= -1 (-1: unlimited), got {self.controller_failure_limit}")
        if self.num_to_keep < 1:
            raise ConfigError("num_to_keep", f"must be >= 1, got {self.num_to_keep}")
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")


@dataclass
class OptimConfig:
    """The worker loop: optimiser, schedule, objective knobs, checkpoint cadence."""

    epochs: int = 2
    max_steps: int = 0  # 0: no step cap, run ``epochs``
    batch_size: int = 128  # per worker
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    kl_weight: float = 1.0  # the beta / lambda weight
    kl_warmup_steps: int = 0
    free_bits: float = 0.0  # nats per latent group
    ema_decay: float = 0.0  # 0: no EMA weights
    bf16: bool = False  # autocast on GPU; optional on CPU
    max_skipped_steps: int = 20
    checkpoint_every: int = 200  # steps; 0: only at epoch end
    log_every: int = 20
    eval_batches: int = 8
    iwae_k: int = 64
    iwae_images: int = 64
    seed: int = 0
    torch_threads: int = 0  # 0: leave torch's default

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every", "eval_batches", "iwae_k", "iwae_images"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "kl_warmup_steps", "checkpoint_every",
                     "max_skipped_steps", "torch_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "kl_weight", "free_bits"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrackingConfig:
    """MLflow and Prometheus. Credentials never live here: they come from the environment."""

    mlflow_uri: str = ""  # "": MLFLOW_TRACKING_URI from the environment (the stack sets it)
    experiment: str = "vae"
    registered_model: str = "vae"
    alias: str = "candidate"
    metrics_port: int = 0  # 0: pick a free port per worker; -1: no Prometheus endpoint
    metrics_host: str = "127.0.0.1"  # on a cluster: 0.0.0.0 with a fixed metrics_port
    metrics_sd_dir: str = ".stack/prometheus/targets"  # file_sd targets for the stack's Prometheus

    def __post_init__(self):
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", f"must be a port, 0 or -1, got {self.metrics_port}")

    def resolved(self) -> TrackingConfig:
        """This config with ``mlflow_uri`` filled from ``MLFLOW_TRACKING_URI`` if empty."""
        uri = self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise ConfigError("tracking.mlflow_uri", "empty and MLFLOW_TRACKING_URI is not set "
                              "(run `make up`, or set it to your tracking server)")
        return dataclasses.replace(self, mlflow_uri=uri)


@dataclass
class TrainJob:
    data: StreamConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        m, d = self.model, self.data
        if d.image_size and d.image_size != m.image_size:
            raise ConfigError(
                "data.image_size", f"{d.image_size} differs from model.image_size={m.image_size}"
            )
        if d.channels and d.channels != m.in_channels:
            raise ConfigError(
                "data.channels", f"{d.channels} differs from model.in_channels={m.in_channels}"
            )


@dataclass
class SampleConfig:
    """The gallery job: which model, what to draw, where to write."""

    output_url: str
    model_name: str = "vae"
    model_alias: str = "candidate"
    model_version: int = 0  # 0: use the alias
    checkpoint_url: str = ""  # set instead of the registry to sample from a checkpoint
    data_url: str = ""  # held-out shards for reconstructions/interpolations; "" skips them
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.0])
    grid_rows: int = 8
    grid_cols: int = 8
    interpolation_pairs: int = 8
    interpolation_steps: int = 10
    traversal_dims: int = 8
    traversal_steps: int = 9
    traversal_range: float = 3.0
    seed: int = 0
    num_samples: int = 0  # >0: large-N mode, N samples as WebDataset shards
    samples_per_shard: int = 10000
    batch_size: int = 512
    num_actors: int = 1

    def __post_init__(self):
        if not self.output_url:
            raise ConfigError("output_url", "must be a URL or path for the gallery")
        for name in ("grid_rows", "grid_cols", "interpolation_steps", "traversal_steps",
                     "samples_per_shard", "batch_size", "num_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("interpolation_pairs", "traversal_dims", "num_samples", "model_version"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ConfigError("temperatures", f"must be a non-empty list of numbers > 0, got {self.temperatures}")


@dataclass
class SampleJob:
    sample: SampleConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class IngestJob:
    ingest: IngestConfig


JOB_KINDS: dict[str, type] = {"train": TrainJob, "sample": SampleJob, "ingest": IngestJob}


@dataclass
class JobSpec:
    """A ``jobs/*.yaml`` file: what to run, how Ray ships it, and the typed job config."""

    kind: str
    entrypoint: str
    config: Any
    runtime_env: dict = field(default_factory=dict)
    path: str = ""


_RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "pip", "py_modules", "config"}


def load_job(path: str | Path) -> JobSpec:
    """Load and validate a job yaml; raise :class:`ConfigError` naming file and key."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError("", "file not found", path) from None
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError("", f"{where}not valid yaml ({getattr(e, 'problem', e)})", path) from None
    try:
        return parse_job(raw, path)
    except ConfigError as e:
        raise e.within(file=path) from None


def parse_job(raw: Any, path: str = "") -> JobSpec:
    if not isinstance(raw, dict):
        raise ConfigError("", "expected a mapping with kind, entrypoint, runtime_env, config")
    allowed = {"kind", "entrypoint", "runtime_env", "config"}
    for k in raw:
        if k not in allowed:
            raise ConfigError(str(k), f"unknown key (expected one of: {', '.join(sorted(allowed))})")
    kind = raw.get("kind")
    if kind not in JOB_KINDS:
        raise ConfigError("kind", f"expected one of {', '.join(map(repr, JOB_KINDS))}, got {kind!r}")
    entrypoint = raw.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise ConfigError("entrypoint", "missing: expected the command Ray runs, e.g. 'python -m pipeline ...'")
    runtime_env = raw.get("runtime_env") or {}
    if not isinstance(runtime_env, dict):
        raise ConfigError("runtime_env", f"expected a mapping, got {runtime_env!r}")
    for k in runtime_env:
        if k not in _RUNTIME_ENV_KEYS:
            raise ConfigError(f"runtime_env.{k}", f"unknown key (expected one of: {', '.join(sorted(_RUNTIME_ENV_KEYS))})")
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise ConfigError("runtime_env.env_vars", f"expected a mapping, got {env_vars!r}")
    for k, v in env_vars.items():
        if any(s in str(k).upper() for s in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")):
            raise ConfigError(
                f"runtime_env.env_vars.{k}",
                "secrets must not live in job yamls; set them in the cluster's environment",
            )
        if not isinstance(v, str):
            raise ConfigError(f"runtime_env.env_vars.{k}", f"expected a string, got {v!r}")
    if "config" not in raw:
        raise ConfigError("config", "missing required key (expected a mapping)")
    config = build(JOB_KINDS[kind], raw["config"], prefix="config")
    return JobSpec(kind=kind, entrypoint=entrypoint, config=config, runtime_env=runtime_env, path=path)
