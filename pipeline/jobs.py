"""Job yamls: what to run (``entrypoint``), how Ray ships it (``runtime_env``), the typed ``config``.

Config flows one way: yaml -> dataclasses on the driver -> ``asdict()`` handed to workers ->
rebuilt with :func:`pipeline.typed.build`. Every error is one line naming the file, the
dotted key and what was expected. Each concern's config lives next to its code:
:mod:`pipeline.data.config`, :mod:`pipeline.model.config`, :mod:`pipeline.train.config`,
:mod:`pipeline.serve.config`, :mod:`pipeline.sweep.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.config import IngestJob
from pipeline.errors import ConfigError
from pipeline.serve.config import SampleJob
from pipeline.sweep.config import SweepJob
from pipeline.train.config import TrainJob
from pipeline.typed import build

__all__ = ["JOB_KINDS", "JobSpec", "StrictLoader", "load_job", "parse_job"]

JOB_KINDS: dict[str, type] = {
    "train": TrainJob,
    "sample": SampleJob,
    "ingest": IngestJob,
    "sweep": SweepJob,
}


@dataclass
class JobSpec:
    """A ``jobs/*.yaml`` file: what to run, how Ray ships it, and the typed job config."""

    kind: str
    entrypoint: str
    config: Any
    runtime_env: dict = field(default_factory=dict)
    path: str = ""


_RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "pip", "py_modules", "config"}
_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor`: overriding merged keys is the point


class StrictLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is a
    :class:`ConfigError` naming the dotted key and both lines (yaml keeps the last silently).

    The check walks the composed node graph before any collection is constructed: merging
    (``<<: *anchor``) rewrites mappings in place, and overriding a merged key is allowed.
    """

    def construct_document(self, node):
        self.check_keys(node, "", set())
        return super().construct_document(node)

    def check_keys(self, node, path: str, visited: set[int]) -> None:
        if id(node) in visited:  # an alias: checked where its anchor is
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self.check_keys(child, f"{path}[{i}]", visited)
        if not isinstance(node, yaml.MappingNode):
            return
        lines: dict = {}  # key -> line it first appears on
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            dotted = f"{path}.{key_node.value}" if path else key_node.value  # as written
            if key in lines:
                raise ConfigError(
                    dotted, f"line {line}: duplicate key (first on line {lines[key]})"
                )
            lines[key] = line
            self.check_keys(value_node, dotted, visited)


def load_job(path: str | Path) -> JobSpec:
    """Load and validate a job yaml; raise :class:`ConfigError` naming file and key."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError("", "file not found", path) from None
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            "", f"not a text yaml file ({e.reason} at byte {e.start})", path
        ) from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)
    except ConfigError as e:
        raise e.within(file=path) from None
    except yaml.reader.ReaderError as e:  # valid UTF-8, but control characters: binary
        what = f"unacceptable character #x{e.character:04x} at position {e.position}"
        raise ConfigError("", f"not a text yaml file ({what})", path) from None
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
            raise ConfigError(
                str(k), f"unknown key (expected one of: {', '.join(sorted(allowed))})"
            )
    kind = raw.get("kind")
    if kind not in JOB_KINDS:
        raise ConfigError(
            "kind", f"expected one of {', '.join(map(repr, JOB_KINDS))}, got {kind!r}"
        )
    entrypoint = raw.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise ConfigError(
            "entrypoint", "missing: expected the command Ray runs, e.g. 'python -m pipeline ...'"
        )
    runtime_env = raw.get("runtime_env") or {}
    if not isinstance(runtime_env, dict):
        raise ConfigError("runtime_env", f"expected a mapping, got {runtime_env!r}")
    for k in runtime_env:
        if k not in _RUNTIME_ENV_KEYS:
            raise ConfigError(
                f"runtime_env.{k}",
                f"unknown key (expected one of: {', '.join(sorted(_RUNTIME_ENV_KEYS))})",
            )
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
    return JobSpec(
        kind=kind, entrypoint=entrypoint, config=config, runtime_env=runtime_env, path=path
    )
