"""S3 access through the standard AWS credential chain, against the real local S3: with no
keys in the environment, the keys in a shared credentials file are the ones used."""

from __future__ import annotations

import os
import secrets

import pytest

from pipeline import storage
from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.stream import ShardStream, make_loader


def chain_env(monkeypatch, s3, credentials_file) -> None:
    """The endpoint from the environment, the keys only in ``credentials_file``; nothing else
    the chain could find (no config file, profile, web identity or instance metadata)."""
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(credentials_file.parent / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def write_credentials(path, key: str, secret: str) -> None:
    path.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    path.chmod(0o600)


@pytest.fixture
def bucket(s3):
    return s3.make_bucket("chain-" + secrets.token_hex(4))


def test_round_trip_with_keys_only_in_a_shared_credentials_file(s3, bucket, tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    write_credentials(creds, s3.access_key, s3.secret_key)
    chain_env(monkeypatch, s3, creds)
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
    data = os.urandom(3 * 2**20 + 17)  # odd length, several read blocks
    url = f"{bucket}/chain/blob.bin"
    storage.put_atomic(url, data)
    assert storage.read_bytes(url) == data
    with storage.open_url(url) as f:
        assert f.read() == data
    assert storage.listdir(f"{bucket}/chain") == ["blob.bin"]


def test_shards_stream_through_the_chain_in_loader_workers(s3, bucket, tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    write_credentials(creds, s3.access_key, s3.secret_key)
    chain_env(monkeypatch, s3, creds)
    url = f"{bucket}/synthetic"
    ingest(
        IngestConfig(
            output_url=url,
            source="synthetic",
            synthetic_count=40,
            synthetic_size=8,
            test_fraction=0.0,
            shard_samples=10,
            workers=1,
        ),
        progress=False,
    )
    stream = ShardStream(
        StreamConfig(train_url=f"{url}/train", num_workers=2, shuffle_buffer=0),
        rank=0,
        world_size=1,
        batch_size=8,
        split="train",
    )
    stream.set_epoch(0)
    batches = list(make_loader(stream))
    assert len(batches) == 5
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 40
    assert all(tuple(b["image"].shape) == (8, 1, 8, 8) for b in batches)


def test_the_file_s_keys_are_the_ones_used(s3, bucket, tmp_path, monkeypatch):
    import s3fs

    creds = tmp_path / "credentials"
    write_credentials(creds, s3.access_key, "wrong-" + secrets.token_hex(16))
    chain_env(monkeypatch, s3, creds)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made with other keys is not reused
    try:
        with pytest.raises(storage.StorageError, match="access denied"):
            storage.read_bytes(f"{bucket}/nothing", retries=0)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_no_credentials_anywhere_is_one_line_naming_the_url_and_the_chain(
    s3, tmp_path, monkeypatch
):
    chain_env(monkeypatch, s3, tmp_path / "no-such-credentials")
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes("s3://some-bucket/key", retries=0)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("s3://some-bucket/key: no S3 credentials found (tried ")
    for source in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SHARED_CREDENTIALS_FILE",
        "web identity/IRSA",
        "instance roles",
    ):
        assert source in msg


def test_partial_keys_in_the_environment_fail_naming_the_missing_one(s3, tmp_path, monkeypatch):
    chain_env(monkeypatch, s3, tmp_path / "no-such-credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    with pytest.raises(storage.StorageError) as e:
        storage.get_fs("s3://some-bucket/key")
    assert str(e.value).startswith("s3://some-bucket/key: the AWS credential chain failed (")
    assert "AWS_SECRET_ACCESS_KEY" in str(e.value) and s3.access_key not in str(e.value)
