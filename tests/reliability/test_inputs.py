"""The bad-input catalogue (tests/fixtures/bad_inputs): every case is one job yaml run through
``pipeline.cli.main`` against the real S3 and MLflow servers. Each must exit non-zero with
exactly one stderr line naming the problem and the file/key/URL, print nothing on stdout,
show no secret, and leave nothing behind: no checkpoint folder, no gallery or ingest output,
no MLflow run, no new (or temp) S3 object.

Header lines of a fixture::

    # expect: <substring of the error line>      one or more; placeholders are substituted
    # command: train | sample | ingest
    # setup: <name of a setup function below>   optional: data the case needs in ${TMP}
    # env: NAME=value -NAME ...                 optional: environment changes (-: unset)

Placeholders: ${TMP} (the case's tmp_path), ${DATA} (local datasets: l32, rgb28), ${S3} (a good
28x28 grayscale dataset on S3), ${MLFLOW} (the tracking URI), ${DEAD} (a closed port), ${CASE}.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import string
import tarfile
from pathlib import Path

import pytest

from pipeline import cli, storage
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from pipeline.stack import free_port
from tests.helpers import FIXTURES, experiment_runs, patched_environ

BAD = sorted((FIXTURES / "bad_inputs").glob("*.yaml"))
PLANTED = ("planted-in-yaml-0451", "wrong-secret-0123456789")  # secrets some cases carry
BUCKETS = ("rel-inputs",)
PROGRESS = re.compile(r"^ingest \w+: +\d+%\|")

pytestmark = pytest.mark.timeout(120)


def header(path: Path) -> dict[str, str]:
    out: dict = {"expect": []}
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        if key == "expect":
            out["expect"].append(value)
        else:
            out[key] = value
    assert out["expect"] and "command" in out, path
    return out


@pytest.fixture(scope="module")
def inputs(s3, mlflow_server, tmp_path_factory):
    """Datasets (local and on S3) and a registered model ``rel-model@candidate``."""
    root = tmp_path_factory.mktemp("bad-inputs-data")
    with patched_environ(s3.env):
        s3.make_bucket("rel-inputs")
        base = dict(
            source="synthetic", synthetic_count=64, test_fraction=0.25, shard_samples=16, workers=1
        )
        ingest(
            IngestConfig(output_url=str(root / "good"), synthetic_size=28, **base), progress=False
        )
        ingest(
            IngestConfig(output_url=str(root / "l32"), synthetic_size=32, **base), progress=False
        )
        ingest(
            IngestConfig(
                output_url=str(root / "rgb28"), synthetic_size=28, synthetic_mode="RGB", **base
            ),
            progress=False,
        )
        ingest(
            IngestConfig(output_url="s3://rel-inputs/good", synthetic_size=28, **base),
            progress=False,
        )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    if not client.search_registered_models("name = 'rel-model'"):
        client.create_registered_model("rel-model")
        mv = client.create_model_version("rel-model", "s3://mlflow-test/none")
        client.set_registered_model_alias("rel-model", "candidate", mv.version)
    return {"DATA": str(root), "S3": "s3://rel-inputs/good", "MLFLOW": mlflow_server.uri}


# ------------------------------------------------------------------------- setups


def _copy_good(inputs, tmp: Path) -> Manifest:
    shutil.copytree(Path(inputs["DATA"]) / "good" / "train", tmp / "data" / "train")
    text = (tmp / "data" / "train" / "manifest.json").read_text()
    return Manifest.from_json(text, str(tmp / "data" / "train"))


def _rewrite(tmp: Path, edit) -> None:
    path = tmp / "data" / "train" / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def setup_empty(inputs, tmp):
    m = _copy_good(inputs, tmp)
    for f in (tmp / "data" / "train").glob("*.tar"):
        f.unlink()
    write_manifest(Manifest("train", [], m.stats), str(tmp / "data" / "train"))


def setup_missing_shard(inputs, tmp):
    m = _copy_good(inputs, tmp)
    m.shards.append(ShardInfo("shard-000099.tar", 16, 1000, "0" * 64))
    write_manifest(m, str(tmp / "data" / "train"))


def setup_shard_size(inputs, tmp):
    _copy_good(inputs, tmp)
    _rewrite(tmp, lambda doc: doc["shards"][0].update(bytes=doc["shards"][0]["bytes"] - 512))


def setup_count_mismatch(inputs, tmp):
    _copy_good(inputs, tmp)
    _rewrite(tmp, lambda doc: doc.update(count=99))


def setup_not_json(inputs, tmp):
    _copy_good(inputs, tmp)
    (tmp / "data" / "train" / "manifest.json").write_text('{"version": 1, "split": ')


def setup_version(inputs, tmp):
    _copy_good(inputs, tmp)
    _rewrite(tmp, lambda doc: doc.update(version=7))


def setup_mixed_sizes(inputs, tmp):
    _copy_good(inputs, tmp)
    _rewrite(tmp, lambda doc: doc["stats"].update(width=0, height=0))


def _checkpoint(tmp: Path) -> Path:
    from pipeline.model import build_model
    from pipeline.train import checkpoint

    model = {"image_size": 28, "in_channels": 1, "channels": [8, 16], "latent_dim": 8}
    d = tmp / "ckpt-in"
    checkpoint.save(d, model=build_model(model), state={"step": 1, "config": {"model": model}})
    return d


def setup_good_ckpt(inputs, tmp):
    _checkpoint(tmp)


def setup_tampered_ckpt(inputs, tmp):
    path = _checkpoint(tmp) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def setup_incomplete_ckpt(inputs, tmp):
    (_checkpoint(tmp) / "checksums.json").unlink()


def setup_file_in_the_way(inputs, tmp):
    (tmp / "a-file").write_text("not a folder")


def setup_evil_archive(inputs, tmp):
    with tarfile.open(tmp / "evil.tar", "w") as tar:
        for name in ("cats/ok.png", "../evil.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"png"))


# ------------------------------------------------------------------------- the catalogue


def test_catalogue_is_large():
    assert len(BAD) >= 25
    commands = sorted({header(p)["command"] for p in BAD})
    assert commands == ["ingest", "sample", "train"]


def s3_keys(bucket: str) -> set[str]:
    fs, root = storage.get_fs(f"s3://{bucket}")
    return set(fs.find(root)) if fs.exists(root) else set()


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_input_one_line_nothing_left(path, inputs, s3_env, tmp_path, monkeypatch, capsys):
    h = header(path)
    case = path.stem.split("_", 1)[1].replace("_", "-")
    subs = {**inputs, "TMP": str(tmp_path), "CASE": case, "DEAD": f"http://127.0.0.1:{free_port()}"}
    job = tmp_path / "job.yaml"
    job.write_text(string.Template(path.read_text()).substitute(subs))
    expect = [string.Template(e).substitute(subs) for e in h["expect"]]
    monkeypatch.setenv("PIPELINE_STACK_DIR", str(tmp_path / "no-stack"))  # no ambient stack
    monkeypatch.setenv("MLFLOW_TRACKING_URI", inputs["MLFLOW"])
    for item in string.Template(h.get("env", "")).substitute(subs).split():
        if item.startswith("-"):
            monkeypatch.delenv(item[1:], raising=False)
        else:
            key, _, value = item.partition("=")
            monkeypatch.setenv(key, value)
    if "setup" in h:
        globals()[f"setup_{h['setup']}"](inputs, tmp_path)
    with monkeypatch.context() as m:
        for k, v in s3_env.env.items():
            m.setenv(k, v)
        before = {b: s3_keys(b) for b in BUCKETS}

    rc = cli.main([h["command"], str(job)])
    out, err = capsys.readouterr()

    assert rc == 2 and out == "", (rc, out)
    # progress bars (ingest's tqdm, carriage-return updates of one terminal line) aside
    lines = [ln for ln in err.strip().splitlines() if not PROGRESS.match(ln)]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and all(e in lines[0] for e in expect), (expect, lines)
    for secret in (s3_env.secret_key, *PLANTED):
        assert secret not in err
    # nothing left behind
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()
    if (tmp_path / "a-file").exists():
        assert (tmp_path / "a-file").read_text() == "not a folder"
    assert len(experiment_runs(inputs["MLFLOW"], f"bad-{case}")) == 0
    with monkeypatch.context() as m:
        for k, v in s3_env.env.items():
            m.setenv(k, v)
        after = {b: s3_keys(b) for b in BUCKETS}
    assert after == before
    assert not [k for keys in after.values() for k in keys if storage.TMP_MARK in k]
