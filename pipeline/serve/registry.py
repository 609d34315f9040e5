"""Find and load trained VAEs: MLflow registry (name + alias or version) or a checkpoint URL.

The model is always rebuilt from the config stored with it, never from a training yaml, and
its weights load from safetensors: no pickle runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.errors import PipelineError, first_line
from pipeline.model import VAE, build_model, load_weights


@dataclass
class ModelRef:
    """What to load. ``checkpoint_url`` wins over the registry."""

    name: str = ""
    alias: str = ""
    version: int = 0  # 0: use the alias
    checkpoint_url: str = ""
    tracking_uri: str = ""

    @classmethod
    def parse(cls, uri: str, tracking_uri: str = "") -> ModelRef:
        """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a checkpoint URL/path."""
        if uri.startswith("models:/"):
            rest = uri.removeprefix("models:/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                return cls(name=name, alias=alias, tracking_uri=tracking_uri)
            name, _, version = rest.partition("/")
            if not version.isdigit():
                raise PipelineError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            return cls(name=name, version=int(version), tracking_uri=tracking_uri)
        return cls(checkpoint_url=uri, tracking_uri=tracking_uri)

    def describe(self) -> str:
        if self.checkpoint_url:
            return self.checkpoint_url
        return (
            f"models:/{self.name}/{self.version}"
            if self.version
            else f"models:/{self.name}@{self.alias}"
        )


@dataclass
class LoadedModel:
    vae: VAE
    name: str
    version: str  # registry version, or "ckpt-<sha>" for a checkpoint URL
    train_run_id: str
    model_config: dict
    metrics: dict = field(default_factory=dict)


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    from pipeline.train.tracking import configure_client_timeouts

    configure_client_timeouts()
    return MlflowClient(tracking_uri)


def resolve(ref: ModelRef):
    """(version string, MLflow ModelVersion or None); one clear error if it does not exist."""
    if ref.checkpoint_url:
        return f"ckpt-{hashlib.sha256(ref.checkpoint_url.encode()).hexdigest()[:10]}", None
    from mlflow.exceptions import MlflowException

    client = mlflow_client(ref.tracking_uri)
    what = f"version {ref.version}" if ref.version else f"alias {ref.alias!r}"
    try:
        if ref.version:
            mv = client.get_model_version(ref.name, str(ref.version))
        else:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as e:
        text = str(e).lower()
        if "max retries exceeded" in text or "connection" in text or "timed out" in text:
            raise PipelineError(
                f"MLflow at {ref.tracking_uri} unreachable (connection failed)"
            ) from None
        if (
            getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
            or "not found" in text
            or "does not exist" in text
            or "not exist" in text
        ):
            raise PipelineError(
                f"model {ref.name!r} {what} not found in the registry at {ref.tracking_uri}"
            ) from None
        raise PipelineError(f"MLflow at {ref.tracking_uri}: {first_line(e)}") from None
    except Exception as e:  # connection refused, timeout
        raise PipelineError(
            f"MLflow at {ref.tracking_uri} unreachable ({type(e).__name__})"
        ) from None
    return str(mv.version), mv


def load(ref: ModelRef, version: str | None = None, mv=None) -> LoadedModel:
    """Rebuild the VAE of ``ref`` (resolving it first unless ``version``/``mv`` are given)."""
    if version is None:
        version, mv = resolve(ref)
    with tempfile.TemporaryDirectory() as tmp:
        if mv is None:
            from pipeline.train import checkpoint

            local = storage.download_dir(ref.checkpoint_url, tmp)
            saved = checkpoint.load(local, with_optimizer=False)
            cfg = (saved["state"].get("config") or {}).get("model")
            if not isinstance(cfg, dict):
                raise checkpoint.CheckpointError(
                    f"{ref.checkpoint_url}: state.json holds no model config (config.model)"
                )
            vae = build_model(cfg)
            vae.load_state_dict(saved["ema"] if saved["ema"] is not None else saved["model"])
            return LoadedModel(
                vae.eval(),
                ref.name or "checkpoint",
                version,
                saved["state"].get("mlflow_run_id", ""),
                cfg,
            )
        import mlflow

        mlflow.set_tracking_uri(ref.tracking_uri)
        uri = f"models:/{ref.name}/{version}"
        try:
            with _quiet("mlflow"):  # its INFO lines would precede our one error line
                local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        except Exception as e:  # MLflow or its artifact store down, artifacts deleted
            first = first_line(e)
            raise PipelineError(
                f"{uri}: cannot download the model from {ref.tracking_uri} "
                f"({type(e).__name__}: {first})"
            ) from None
        config = next(local.rglob("config.json"), None)
        weights = next(local.rglob("weights.safetensors"), None)
        if config is None or weights is None:
            raise PipelineError(
                f"{uri}: not a model of this pipeline (no config.json and "
                f"weights.safetensors among its artifacts)"
            )
        meta = json.loads(config.read_text())
        vae = build_model(meta["model"])
        vae.load_state_dict(load_weights(weights.read_bytes()))
    run_id = mv.run_id or meta.get("train_run_id", "")
    metrics = dict(mlflow_client(ref.tracking_uri).get_run(run_id).data.metrics) if run_id else {}
    return LoadedModel(vae.eval(), ref.name, version, run_id, meta["model"], metrics)
