"""Job yamls: every malformed fixture fails with one line naming file and key; valid ones load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.jobs import load_job
from pipeline.train.config import TrainJob
from pipeline.typed import build, flatten, to_dict
from tests.helpers import FIXTURES, ROOT

BAD = sorted((FIXTURES / "bad_configs").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


def test_catalogue_is_large():
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_malformed_yaml_one_clear_line(path, capsys):
    rc = cli.main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert expected(path) in lines[0]


@pytest.mark.parametrize("name", ["train", "sample", "ingest"])
def test_shipped_jobs_validate(name, capsys):
    assert cli.main(["validate", str(ROOT / "jobs" / f"{name}.yaml")]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {ROOT / 'jobs' / name}.yaml: {name} job")


def test_validate_exit_code_through_the_console_script():
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(BAD[0])],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    good = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "jobs/train.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert good.returncode == 0, good.stderr


def test_validate_imports_no_heavy_modules():
    # validate must not touch a cluster, server or bucket: it must not even import them.
    code = (
        "import sys; from pipeline import cli; cli.main(['validate', 'jobs/train.yaml']);"
        "print(sorted(m for m in ('ray', 'mlflow', 's3fs', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_round_trip_and_flatten():
    job = load_job(ROOT / "jobs/train.yaml").config
    again = build(TrainJob, to_dict(job))
    assert again == job
    flat = flatten(to_dict(job))
    assert flat["model.channels"] == [32, 64]
    assert flat["scaling.num_workers"] == 2
    assert flat["data.train_url"] == "s3://data/fashion-mnist/train"


def test_missing_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert cli.main(["validate", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: file not found"
