"""Nothing read from a shard can write outside its target: the shard reader writes nothing at
all (tar members are parsed in memory, never extracted), in-process or in DataLoader worker
processes, whatever the member names say. Archive ingest rejects such names outright
(tests/data/test_ingest.py::test_archive_rejects_unsafe_member_names)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data.config import StreamConfig
from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from pipeline.data.stream import ShardStream, make_loader
from tests.helpers import gray_png

pytestmark = pytest.mark.timeout(120)
HOSTILE = ["../escape", "../../etc/escape", "/tmp/abs-escape", "a/../../escape2", "./../esc3"]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def hostile_split(tmp_path) -> Path:
    """One shard whose member names climb out of any folder they might be extracted to."""
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(8):
            key = HOSTILE[i] if i < len(HOSTILE) else f"ok-{i}"
            for name, data in ((f"{key}.png", gray_png(10 * i, 8)), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if i == 0:  # a symlink and a hard link member pointing outside, too
                for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info = tarfile.TarInfo(f"link{kind.decode()}.png")
                    info.type, info.linkname = kind, "../../../../etc/passwd"
                    tar.addfile(info)
    data = buf.getvalue()
    (split / "shard-000000.tar").write_bytes(data)
    stats = {
        "count": 8,
        "width": 8,
        "height": 8,
        "mode": "L",
        "channels": 1,
        "mean": [0.5],
        "std": [0.3],
        "encoding": "png",
        "classes": [],
    }
    shard = ShardInfo("shard-000000.tar", 8, len(data), hashlib.sha256(data).hexdigest())
    write_manifest(Manifest("train", [shard], stats), str(split))
    return split


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_reader_writes_nothing_anywhere(hostile_split, tmp_path, monkeypatch, workers):
    cwd = tmp_path / "data" / "train" / "deep" / "cwd"  # where '../x' would land if extracted
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = tree(tmp_path)
    tmp_before = set(os.listdir("/tmp"))
    config = StreamConfig(train_url=str(hostile_split), shuffle_buffer=8)
    s = ShardStream(config, rank=0, world_size=1, batch_size=4)
    batches = list(make_loader(s, num_workers=workers))
    assert [len(b["key"]) for b in batches] == [4, 4]
    assert tree(tmp_path) == before  # nothing created, in the shard folder or above it
    assert not Path("/tmp/abs-escape.png").exists()
    assert {n for n in set(os.listdir("/tmp")) - tmp_before if "escape" in n} == set()
    # hostile names never reach the batch: their slots hold repeats of good samples
    keys = {k for b in batches for k in b["key"]}
    assert keys == {"ok-5", "ok-6", "ok-7"}


def test_shard_reader_rejects_unsafe_member_names(hostile_split):
    config = StreamConfig(train_url=str(hostile_split), shuffle_buffer=8)
    s = ShardStream(config, rank=0, world_size=1, batch_size=4)
    batches = list(make_loader(s, num_workers=0))
    keys = {k for b in batches for k, pad in zip(b["key"], b["pad"].tolist()) if not pad}
    assert keys == {"ok-5", "ok-6", "ok-7"}
    assert s.stats()["bad_reasons"].get("unsafe_name") == len(HOSTILE)


def test_error_lines_redact_secrets(monkeypatch, capsys):
    from pipeline import cli
    from pipeline.errors import PipelineError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-4242")
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "svc-token-4242")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/tmp/token-path")  # a path, not a secret
    assert cli.redact(
        "https://bob:pw-4242@mlflow.example:5000/x and aws-secret-4242, "
        "svc-token-4242 at /tmp/token-path"
    ) == ("https://***@mlflow.example:5000/x and ***, *** at /tmp/token-path")

    def boom(args):
        raise PipelineError("s3://b/k: denied for aws-secret-4242\n  second line")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    assert cli.main(["validate", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "error: s3://b/k: denied for *** second line\n"


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    """``.pyd``/``.pkl``/``.pt`` members (webdataset's default decoders would unpickle them)
    are never decoded: a sample with only such members is a ``no_image`` bad sample, one with
    an image beside them is read for its image alone; no payload runs."""
    import pickle

    import torch

    from tests.helpers import tar_bytes

    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Payload(str(marker)))
    pt = io.BytesIO()
    torch.save({"x": _Payload(str(marker))}, pt)
    hostile = {"pyd": payload, "pkl": payload, "pt": pt.getvalue()}
    samples = []
    for i in range(8):
        ext = list(hostile)[i % 3]
        if i < 3:  # nothing but the pickle
            samples.append([(f"s{i}.{ext}", hostile[ext])])
        else:
            samples.append([(f"s{i}.png", gray_png(10 * i, 8)), (f"s{i}.{ext}", hostile[ext])])
    data = tar_bytes(samples)
    split = tmp_path / "train"
    split.mkdir()
    (split / "shard-000000.tar").write_bytes(data)
    stats = {"count": 8, "width": 8, "height": 8, "mode": "L", "channels": 1, "mean": [0.5]}
    stats |= {"std": [0.3], "encoding": "png", "classes": []}
    shard = ShardInfo("shard-000000.tar", 8, len(data), hashlib.sha256(data).hexdigest())
    write_manifest(Manifest("train", [shard], stats), str(split))

    s = ShardStream(StreamConfig(train_url=str(split), shuffle_buffer=8), 0, 1, batch_size=4)
    batches = list(make_loader(s, num_workers=2))
    assert not marker.exists(), "a pickle member was unpickled"
    keys = {k for b in batches for k, pad in zip(b["key"], b["pad"].tolist()) if not pad}
    assert keys == {f"s{i}" for i in range(3, 8)}
    assert s.stats()["bad_reasons"] == {"no_image": 3}
    pickle.loads(payload)  # the control: the payload does run when unpickled
    assert marker.exists()


def test_dependency_floors_are_above_known_advisories():
    """pyproject's floors exclude the versions with the advisories the pipeline is exposed to,
    and both lock files satisfy them (infra/local/check_install.py fails otherwise)."""
    import re

    from packaging.requirements import Requirement
    from packaging.version import Version

    from tests.helpers import ROOT

    project = (ROOT / "pyproject.toml").read_text().split("dependencies = [", 1)[1]
    deps = re.findall(r'^\s*"([^"]+)",', project.split("]\n", 1)[0], re.M)
    reqs = {Requirement(d).name: Requirement(d) for d in deps}
    advisories = {"torch": "2.5.1", "ray": "2.55.99", "mlflow": "3.14.99", "pillow": "12.1.99"}
    for name, bad in advisories.items():
        assert not reqs[name].specifier.contains(bad, prereleases=True), (name, reqs[name])
    for lock in ("lock-cpu.txt", "lock-cuda.txt"):
        text = (ROOT / "requirements" / lock).read_text()
        pins = {k.lower(): v for k, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}
        for name in advisories:
            assert reqs[name].specifier.contains(Version(pins[name]), prereleases=True), lock
