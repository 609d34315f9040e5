"""pipeline.storage on local paths and a real SeaweedFS S3 server: atomic publish, errors."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import pytest

from pipeline import storage
from pipeline.errors import ConfigError


def _atomic_write_roundtrip(base: str) -> None:
    url = storage.join(base, "dir", "x.bin")
    with storage.atomic_write(url) as f:
        f.write(b"half")
        f.flush()
        assert not storage.exists(url)  # no final key before completion
        f.write(b"-done")
    assert storage.read_bytes(url) == b"half-done"
    assert storage.listdir(storage.join(base, "dir")) == ["x.bin"]  # no temp key left

    failed = storage.join(base, "dir", "y.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_write(failed) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not storage.exists(failed)
    assert storage.listdir(storage.join(base, "dir")) == ["x.bin"]

    storage.put_atomic(failed, b"whole")
    assert storage.read_bytes(failed) == b"whole" and storage.size(failed) == 5
    storage.remove(failed)
    assert storage.listdir(storage.join(base, "dir")) == ["x.bin"]


def test_atomic_write_local(tmp_path):
    _atomic_write_roundtrip(str(tmp_path))
    assert storage.join("s3://b/p/", "/train/", "x.tar") == "s3://b/p/train/x.tar"


def test_atomic_write_s3(s3_env):
    _atomic_write_roundtrip(s3_env.make_bucket("storage-atomic") + f"/{uuid.uuid4().hex}")


def test_temp_key_is_visible_only_under_a_dot_name(s3_env):
    base = s3_env.make_bucket("storage-tmp") + f"/{uuid.uuid4().hex}"
    with storage.atomic_write(storage.join(base, "shard.tar")) as f:
        f.write(b"x" * 10)
        f.flush()
        names = storage.listdir(base)
        assert all(n.startswith(".shard.tar.tmp-") for n in names)
    assert storage.listdir(base) == ["shard.tar"]


def test_s3_errors_are_one_line_naming_the_url(s3_env, monkeypatch):
    bucket = s3_env.make_bucket("storage-errors") + f"/{uuid.uuid4().hex}"
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-\w+/x: bucket"):
        storage.read_bytes(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x")
    with pytest.raises(storage.StorageError, match=rf"{bucket}/missing: no such file"):
        storage.read_bytes(f"{bucket}/missing")
    storage.put_atomic(f"{bucket}/ok", b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(storage.StorageError, match="access denied") as e:
        storage.read_bytes(f"{bucket}/ok")
    assert "definitely-wrong-secret" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(
        storage.StorageError, match=r"credential chain failed .*AWS_SECRET_ACCESS_KEY"
    ):
        storage.read_bytes(f"{bucket}/ok")


def test_unreachable_endpoint_gives_up_after_bounded_retries(s3_env, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"127.0.0.1:{port}.*gave up after 3 attempts"):
        storage.read_bytes("s3://any-bucket/x", retries=2, backoff=0.01)
    assert time.monotonic() - t0 < 30


def test_credentials_never_come_from_config():
    with pytest.raises(ConfigError, match=r"storage_options: credentials .* \(remove secret\)"):
        storage.get_fs("s3://b/x", {"secret": "s"})


def test_preloaded_s3_models_serve_later_clients_unless_the_data_path_changed(
    s3_env, monkeypatch, tmp_path
):
    """preload_s3_models() (the forkserver's) parses botocore's S3 models once; a filesystem
    made afterwards reads them through a session of its own, and still works end to end."""
    monkeypatch.setattr(storage, "_warm_models", None)
    monkeypatch.setattr(storage, "_remote", {})  # no filesystem cached from before
    storage.preload_s3_models()
    assert storage._warm_models is not None
    _, loader = storage._warm_models
    url = s3_env.make_bucket("storage-preload") + f"/{uuid.uuid4().hex}/x.bin"
    before = storage.clients_created(preloaded=True)
    storage.put_atomic(url, b"payload")
    assert storage.read_bytes(url) == b"payload"
    fs, _ = storage.get_fs(url)
    assert fs.session.get_component("data_loader") is loader
    assert storage.clients_created(preloaded=True) == before + 1

    # another AWS_DATA_PATH: other model files may apply, so s3fs builds its own session
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    monkeypatch.setattr(storage, "_remote", {})
    assert storage.read_bytes(url) == b"payload"
    fs, _ = storage.get_fs(url)
    assert fs.session.get_component("data_loader") is not loader
    assert storage.clients_created(preloaded=True) == before + 1


def test_object_stream_resumes_the_same_object_and_refuses_a_changed_one(s3_env):
    """open_object: one GET; a retry asks for the bytes not read yet of the same object
    (Range + If-Match), so a resumed read is byte-identical and an overwritten object fails
    rather than splicing two versions."""
    url = s3_env.make_bucket("storage-object") + f"/{uuid.uuid4().hex}/x.bin"
    payload = bytes(range(256)) * 400
    storage.put_atomic(url, payload)
    obj = storage.open_object(url)
    assert obj is not None and storage.open_object("/tmp/x") is None
    head = obj.read(1000)
    obj.close()
    obj.body = None  # as after a cut connection: the next read sends a ranged GET
    assert head + obj.read() == payload and obj.pos == len(payload)
    assert obj.read() == b""

    obj = storage.open_object(url)
    head = obj.read(1000)
    obj.close()
    obj.body = None
    storage.put_atomic(url, payload[::-1])
    with pytest.raises(OSError, match="pre-conditions"):
        obj.read()

    with pytest.raises(FileNotFoundError):
        storage.open_object(url + ".missing").read()
    # an option only s3fs knows: shard reads stay with s3fs
    assert storage.open_object(url, {"requester_pays": True}) is None


def test_object_streams_read_to_the_end_share_one_connection(s3_env):
    """Each object read to its end hands the connection back to the client's pool: three
    shards, three GETs, one TCP connection; the bytes are the objects'."""
    base = s3_env.make_bucket("storage-pool") + f"/{uuid.uuid4().hex}"
    payloads = [bytes([i]) * (100_000 + 4_099 * i) for i in range(3)]
    for i, payload in enumerate(payloads):
        storage.put_atomic(f"{base}/{i}.bin", payload)
    client = storage.open_object(f"{base}/0.bin").client  # this process's, maybe used before

    def counts() -> tuple[int, int]:
        # botocore keeps urllib3's pool manager behind its endpoint (no public accessor)
        pools = client._endpoint.http_session._manager.pools
        each = [pools[k] for k in pools.keys()]
        return sum(p.num_requests for p in each), sum(p.num_connections for p in each)

    requests, connections = counts()
    for i, payload in enumerate(payloads):
        obj = storage.open_object(f"{base}/{i}.bin")
        parts = []
        while part := obj.read(30_000):
            parts.append(part)
        obj.close()
        assert obj.client is client
        assert b"".join(parts) == payload and obj.left == 0
    more_requests, more_connections = counts()
    # one new connection at most (none if an earlier read left one in the pool)
    assert more_requests - requests == 3 and more_connections - connections <= 1


def test_a_forked_process_takes_the_client_built_before_the_fork(s3_env):
    """preload_s3_client (the loader workers' forkserver): a process forked after it reads
    shards through that client instead of building one; the process that built it never
    uses it. A different environment (other keys) gets its own client."""
    url = s3_env.make_bucket("storage-forked") + f"/{uuid.uuid4().hex}.bin"
    storage.put_atomic(url, b"y" * 5000)
    storage.preload_s3_client()

    def in_child(environ: dict[str, str]) -> list[int]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one botocore client, no event loop; leave with os._exit
            try:
                os.environ.update(environ)
                data = storage.open_object(url).read()
                out = [len(data), storage.clients_created(), storage.clients_created(forked=True)]
            except BaseException as e:
                out = [repr(e)]
            finally:
                os.write(write, json.dumps(out).encode())
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            out = f.read()
        os.waitpid(pid, 0)
        return json.loads(out)

    assert in_child({}) == [5000, 1, 1]  # taken, not built
    # an environment the preloaded client was not built in: the child builds its own
    assert in_child({"AWS_CONFIG_FILE": os.devnull}) == [5000, 1, 0]
    before = storage.clients_created(forked=True)
    storage.open_object(url)
    assert storage.clients_created(forked=True) == before == 0


def _collect_in_worker() -> tuple[int, int, int]:
    """In a forkserver child: objects frozen, bytes of pages a full collection copies, and
    how many more one copies once those objects are unfrozen."""
    import gc

    import psutil

    proc = psutil.Process()
    before = proc.memory_full_info().uss
    frozen = gc.get_freeze_count()
    gc.collect()
    kept = proc.memory_full_info().uss
    gc.unfreeze()
    gc.collect()
    return frozen, kept - before, proc.memory_full_info().uss - kept


def test_loader_workers_collect_garbage_without_copying_the_forkservers_objects():
    from pipeline.data import WORKER_PRELOAD

    with storage.process_context(WORKER_PRELOAD).Pool(1) as pool:
        frozen, copied, unfrozen = pool.apply(_collect_in_worker)
    print(f"{frozen} objects frozen; a collection copied {copied} bytes, {unfrozen} unfrozen")
    assert frozen > 100_000  # torch, botocore, ... imported once, in the forkserver
    assert unfrozen > 20 * 2**20  # the baseline: walking them copies their pages
    assert copied < unfrozen / 10
