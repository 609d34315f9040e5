"""``pipeline validate`` on files that are not well-formed job yamls (issue 18, item 3): a
binary file, a key given twice, a URL scheme storage cannot read. Each is one line on stderr
naming the file (and the dotted key, line or URL) and exit code 2; the fixtures in
``tests/fixtures/bad_configs`` (31..36) cover the same through ``test_jobs.py``.
"""

from __future__ import annotations

import pytest
import yaml

from pipeline import cli, storage
from pipeline.errors import ConfigError
from pipeline.jobs import StrictLoader

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x1c"


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "data, reason",
    [
        (PNG_HEAD * 64, "invalid start byte at byte 0"),  # not UTF-8
        (b"kind: train\n\x00\x01\x02\x03", "unacceptable character #x0000 at position 12"),
    ],
    ids=["png", "nul-bytes"],
)
def test_binary_file_is_one_line_exit_2(tmp_path, capsys, data, reason):
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    assert cli.main(["validate", str(path)]) == 2
    assert one_error_line(capsys) == f"error: {path}: not a text yaml file ({reason})"


def test_duplicate_key_names_file_key_and_lines(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(
        "kind: train\n"
        "entrypoint: python -m pipeline train job.yaml\n"
        "config:\n"
        "  data: {train_url: s3://d/train, seed: 1, seed: 2}\n"
    )
    assert cli.main(["validate", str(path)]) == 2
    assert one_error_line(capsys) == (
        f"error: {path}: config.data.seed: line 4: duplicate key (first on line 4)"
    )


def load(text: str):
    return yaml.load(text, Loader=StrictLoader)


def test_strict_loader_finds_duplicates_anywhere_and_keeps_merges():
    with pytest.raises(
        ConfigError, match=r"^a\[1\]\.b: line 4: duplicate key \(first on line 3\)$"
    ):
        load("a:\n  - {x: 1}\n  - b: 1\n    b: 3\n")
    with pytest.raises(ConfigError, match=r"^true: line 2: duplicate key"):
        load("yes: 1\ntrue: 2\n")  # one key in yaml 1.1: both are the boolean true
    # a merge (<<) may override what it merges, and an alias is not a second definition
    text = "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  x: 3\nagain: *b\n"
    merged = {"base": {"x": 1, "y": 2}, "derived": {"x": 3, "y": 2}, "again": {"x": 1, "y": 2}}
    assert load(text) == merged
    assert load("a: 1\nb: {a: 1}\n") == {"a": 1, "b": {"a": 1}}  # same key, other mappings


@pytest.mark.parametrize("url", ["ftp://host/train", "http://host/train", "gs://b/train"])
def test_unsupported_scheme_same_check_at_validate_and_in_storage(url):
    from pipeline.data.config import StreamConfig

    with pytest.raises(ConfigError, match=rf"^train_url: {url}: unsupported URL scheme"):
        StreamConfig(train_url=url)
    with pytest.raises(storage.StorageError, match=rf"^{url}: unsupported URL scheme"):
        storage.get_fs(url)
    for ok in ("s3://b/train", "file:///tmp/train", "/tmp/train", "relative/train"):
        assert StreamConfig(train_url=ok).train_url == ok
