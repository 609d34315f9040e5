"""A stopped stack's settings never reach a client (issue 18, item 1).

``pipeline stack down`` (``make down``) removes ``{stack}/env``, and the CLI loads a stack's
settings only while one of its services runs: after a ``make down``, a crash or a reboot, a
test calling ``cli.main`` in-process or a user's ``pipeline train`` never tries the dead Ray
address. No server starts here: the stack folder is written as ``make up`` writes it, its
ports free (nothing listens), its pid records naming a real process that is alive or gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline import cli, stack
from pipeline.train import driver
from tests.helpers import ROOT

SERVICES = ("seaweedfs", "mlflow", "ray", "prometheus")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def environ():
    """``os.environ`` without any stack setting, restored after the test (``load_stack_env``
    writes it directly)."""
    saved = dict(os.environ)
    for key in [*stack.client_env(Path("x"), stack.StackPorts()), *CREDENTIALS]:
        os.environ.pop(key, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def sleeper():
    """A live process standing in for a service's leader (its own session, as services run)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def gone_process() -> subprocess.Popen:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    proc.create_time = stack.psutil().Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc


def write_stack(state: Path, leaders: dict[str, subprocess.Popen]) -> dict[str, str]:
    """``state`` as ``make up`` leaves it, with a pid record per service naming ``leaders``;
    returns the client settings written to ``{state}/env``."""
    ports = stack.StackPorts.free()
    (state / "pids").mkdir(parents=True)
    (state / "stack.json").write_text(json.dumps({"ports": dataclasses.asdict(ports)}))
    (state / "credentials.env").write_text(
        "AWS_ACCESS_KEY_ID=PLSTALE\nAWS_SECRET_ACCESS_KEY=stale-secret-0123\n"
    )
    env = stack.client_env(state, ports)
    (state / "env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for name, proc in leaders.items():
        created = (
            getattr(proc, "create_time", None) or stack.psutil().Process(proc.pid).create_time()
        )
        record = {"pid": proc.pid, "create_time": created, "marker": f"{name}-test-{proc.pid}"}
        (state / "pids" / f"{name}.json").write_text(json.dumps(record))
    return env


def test_a_stopped_stacks_env_is_not_loaded(tmp_path, environ):
    gone = gone_process()
    env = write_stack(tmp_path, {name: gone for name in SERVICES})
    assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert not stack.running(tmp_path)
    assert stack.load_stack_env(tmp_path) == []
    assert "RAY_ADDRESS" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ


def test_a_running_stacks_env_is_loaded(tmp_path, environ, sleeper):
    env = write_stack(tmp_path, {"ray": sleeper})  # the other services: no record at all
    assert stack.running(tmp_path)
    added = stack.load_stack_env(tmp_path)
    assert {"RAY_ADDRESS", "PIPELINE_RAY_GCS", "AWS_SECRET_ACCESS_KEY"} <= set(added)
    assert os.environ["RAY_ADDRESS"] == env["RAY_ADDRESS"]


def test_stack_down_stops_it_and_removes_its_env(tmp_path, environ, sleeper, capsys):
    write_stack(tmp_path, {"ray": sleeper, "mlflow": gone_process()})
    environ["PIPELINE_STACK_DIR"] = str(tmp_path)
    assert cli.main(["stack", "down"]) == 0
    assert f"ray         stopped 1 process(es): [{sleeper.pid}]" in capsys.readouterr().out
    assert sleeper.poll() is not None
    assert not (tmp_path / "env").exists()
    assert (tmp_path / "credentials.env").exists() and (tmp_path / "stack.json").exists()
    assert stack.load_stack_env(tmp_path) == []


def test_train_after_down_does_not_try_the_dead_address(tmp_path, environ, monkeypatch):
    """``pipeline train`` with a stopped stack's folder: the driver gets no Ray address from
    it (so it starts a local cluster) and no S3/MLflow settings."""
    state = tmp_path / "stack"
    env = write_stack(state, {name: gone_process() for name in SERVICES})
    environ["PIPELINE_STACK_DIR"] = str(state)
    job = tmp_path / "train.yaml"
    job.write_text(
        "kind: train\nentrypoint: python -m pipeline train train.yaml\n"
        f"config:\n  data: {{train_url: {tmp_path / 'data'}}}\n"
        "  tracking: {mlflow_uri: 'http://127.0.0.1:1'}\n"
    )
    seen = {}

    def run_training(config, address=None, env_vars=None):
        seen["gcs"] = driver.ray_address(address)
        seen.update({k: os.environ.get(k) for k in ("RAY_ADDRESS", *CREDENTIALS)})

    monkeypatch.setattr(driver, "run_training", run_training)
    assert cli.main(["train", str(job)]) == 0
    assert env["PIPELINE_RAY_GCS"] not in seen.values()
    assert seen == {"gcs": None, "RAY_ADDRESS": None, **dict.fromkeys(CREDENTIALS)}


def test_the_test_session_never_reads_the_checkouts_stack():
    """conftest.py points the CLI away from the checkout's ``.stack`` (``make demo`` then
    ``make test`` in one checkout), to a folder no test creates."""
    state = Path(os.environ["PIPELINE_STACK_DIR"])
    assert state.is_absolute() and not state.exists()
    assert state.parent == Path(tempfile.gettempdir())
    assert ROOT not in state.parents
