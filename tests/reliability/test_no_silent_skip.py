"""Evidence cannot vanish as a skip (issue 18, item 10): a test whose tool (Prometheus,
kubectl, ...) is missing skips on a laptop but fails under ``CI=true``, which ``.ci/run``
exports; every skip in the suite goes through ``tests.helpers.require``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, require

# pytest.skip(...), @pytest.mark.skip/skipif, pytest.importorskip, `from pytest import skip`
DIRECT_SKIP = re.compile(r"\.skip\(|\bmark\.skip(if)?\b|\bimportorskip\b|\bimport\s.*\bskip\b")


def test_require_skips_locally_and_fails_under_ci(monkeypatch):
    require(True, "present")  # nothing happens
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="^kubectl not installed$"):
        require(None, "kubectl not installed")
    with pytest.raises(pytest.skip.Exception):
        require(False, "no GPU", gpu=True)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="^kubectl not installed .*CI=true"):
        require(None, "kubectl not installed")
    # a GPU is hardware the CI machine may lack: it fails only where CI_GPU=true says it has one
    monkeypatch.delenv("CI_GPU", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(False, "no GPU", gpu=True)
    monkeypatch.setenv("CI_GPU", "true")
    with pytest.raises(pytest.fail.Exception, match="^no GPU .*CI=true"):
        require(False, "no GPU", gpu=True)


def test_a_missing_tool_is_a_failure_in_a_ci_run(tmp_path):
    """The real outcome pytest reports, in a session of its own."""
    test = tmp_path / "test_needs_a_tool.py"
    test.write_text(
        "from tests.helpers import require\n\n"
        "def test_needs_tool():\n"
        "    require(False, 'no-such-tool not installed')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outcomes = {}
    for ci in ("true", ""):
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(test)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**env, "CI": ci},
            timeout=120,
        )
        assert "no-such-tool not installed" in run.stdout, run.stdout + run.stderr
        outcomes[ci] = (run.returncode, re.findall(r"\d+ (?:failed|skipped|passed)", run.stdout))
    assert outcomes == {"true": (1, ["1 failed"]), "": (0, ["1 skipped"])}


def test_every_skip_goes_through_require():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path in (ROOT / "tests" / "helpers.py", Path(__file__)):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if DIRECT_SKIP.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "skip through tests.helpers.require instead:\n" + "\n".join(offenders)


def test_ci_runs_the_tests_with_ci_true():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "export CI=true" in lines
    assert lines.index("export CI=true") < lines.index("make test")
