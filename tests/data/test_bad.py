"""Bad data: corrupt images, non-image members, bombs, wrong sizes and truncated shards are
skipped, counted and padded; equal batch counts still hold; the budget ends the run."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.config import StreamConfig
from pipeline.data.errors import BadDataError
from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from pipeline.data.shards import (
    _byte_sums,
    header_checksum,
    scan_members,
    tar_samples,
    ustar_files,
)
from pipeline.data.stream import ShardStream, make_loader
from pipeline.data.transforms import decode_image
from tests.helpers import bomb_png, gray_png, tar_bytes

SIZE = 6
PER_SHARD = 20
CUT_AT = 12  # shard 1 is cut inside sample 12's image: 11 (in flight, may be partial)..19 lost


def good(key: str, value: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", gray_png(value, SIZE)), (f"{key}.cls", b"1")]


@pytest.fixture(scope="module")
def bad_split(tmp_path_factory) -> tuple[str, set[str]]:
    """Two shards of 20 samples: shard 0 holds 5 bad samples, shard 1 is truncated."""
    root = tmp_path_factory.mktemp("bad")
    s0 = [good(f"s0-{i:03d}", i) for i in range(PER_SHARD)]
    s0[3] = [("s0-003.png", b"\x89PNG\r\n\x1a\n not really a png"), ("s0-003.cls", b"1")]
    s0[7] = [("s0-007.txt", b"a text member, no image")]
    s0[9] = [("s0-009.png", bomb_png())]
    s0[11] = [("s0-011.png", gray_png(5, SIZE + 2))]  # wrong size
    s0[15] = [("s0-015.png", gray_png(9, 40))]  # 1600 pixels > max_pixels below
    s1 = [good(f"s1-{i:03d}", 100 + i) for i in range(PER_SHARD)]
    data0, data1 = tar_bytes(s0), tar_bytes(s1)
    (root / "shard-000000.tar").write_bytes(data0)
    with tarfile.open(fileobj=io.BytesIO(data1)) as t:
        cut = t.getmember(f"s1-{CUT_AT:03d}.png").offset_data + 10
    (root / "shard-000001.tar").write_bytes(data1[:cut])
    shards = [
        ShardInfo(f"shard-{i:06d}.tar", PER_SHARD, len(d), hashlib.sha256(d).hexdigest())
        for i, d in enumerate([data0, data1])
    ]
    stats = {
        "count": 2 * PER_SHARD,
        "width": SIZE,
        "height": SIZE,
        "mode": "L",
        "channels": 1,
        "mean": [0.2],
        "std": [0.1],
        "encoding": "png",
        "classes": [],
    }
    write_manifest(Manifest(split="train", shards=shards, stats=stats), str(root))
    intact = {f"s0-{i:03d}" for i in range(PER_SHARD) if i not in (3, 7, 9, 11, 15)}
    intact |= {f"s1-{i:03d}" for i in range(CUT_AT - 1)}
    return str(root), intact


def run(url: str, world_size: int, workers: int, max_bad: int = 100):
    per_rank, stats = [], []
    for rank in range(world_size):
        config = StreamConfig(
            train_url=url,
            shuffle_buffer=8,
            max_pixels=1000,
            max_bad_samples=max_bad,
            retries=1,
            retry_backoff=0.0,
        )
        s = ShardStream(config, rank=rank, world_size=world_size, batch_size=4)
        per_rank.append(list(make_loader(s, num_workers=workers)))
        stats.append(s.stats())
    return per_rank, stats


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2)])
def test_bad_samples_are_skipped_counted_and_padded(bad_split, world_size, workers):
    url, intact = bad_split
    per_rank, stats = run(url, world_size, workers)
    assert [len(b) for b in per_rank] == [10 // world_size] * world_size  # 40 samples / 4
    reasons = sum((Counter(s["bad_reasons"]) for s in stats), Counter())
    assert dict(reasons) == {
        "decode_error": 1,
        "no_image": 1,
        "too_many_pixels": 2,
        "wrong_size": 1,
        "truncated_shard": PER_SHARD - CUT_AT + 1,
    }
    assert sum(s["bad_samples"] for s in stats) == 14
    seen, pads = [], 0
    for batches in per_rank:
        for b in batches:
            assert b["image"].shape == (4, 1, SIZE, SIZE)
            pads += int(b["pad"].sum())
            seen += [k for k, p in zip(b["key"], b["pad"].tolist()) if not p]
            for k, x in zip(b["key"], b["image"]):  # every pixel of a sample is its value
                if k:
                    value = int(k[3:]) + (100 if k.startswith("s1") else 0)
                    assert set((x * 255).round().int().flatten().tolist()) == {value}
    assert pads == 14
    assert sorted(seen) == sorted(intact) and len(seen) == 26


def test_budget_exceeded_names_the_shard(bad_split):
    url, _ = bad_split
    with pytest.raises(BadDataError, match=r"exceed max_bad_samples=4.*shard-00000\d\.tar"):
        run(url, 1, 0, max_bad=4)


def test_missing_shard_is_unreadable_not_a_hang(bad_split, tmp_path):
    url, _ = bad_split
    manifest = Path(url, "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(manifest)
    (tmp_path / "shard-000000.tar").write_bytes(Path(url, "shard-000000.tar").read_bytes())
    per_rank, stats = run(str(tmp_path), 1, 2)  # shard-000001.tar does not exist here
    assert len(per_rank[0]) == 10
    assert stats[0]["bad_reasons"]["unreadable_shard"] == PER_SHARD


def test_pax_tars_fall_back_to_the_webdataset_parser(tmp_path):
    # pax headers (here: names over 100 bytes) are left to webdataset's tarfile-based reader
    keys = [f"{'k' * 110}-{i}" for i in range(6)]
    data = tar_bytes([good(key, 10 * i) for i, key in enumerate(keys)], tarfile.PAX_FORMAT)
    (tmp_path / "shard-000000.tar").write_bytes(data)
    stats = {
        "count": 6,
        "width": SIZE,
        "height": SIZE,
        "mode": "L",
        "channels": 1,
        "mean": [0.2],
        "std": [0.1],
        "encoding": "png",
        "classes": [],
    }
    info = ShardInfo("shard-000000.tar", 6, len(data), hashlib.sha256(data).hexdigest())
    write_manifest(Manifest(split="train", shards=[info], stats=stats), str(tmp_path))
    s = ShardStream(StreamConfig(train_url=str(tmp_path), shuffle_buffer=4), batch_size=3)
    batches = list(make_loader(s, num_workers=0))
    assert sorted(k for b in batches for k in b["key"]) == sorted(keys)
    assert s.stats()["bad_samples"] == 0
    for b in batches:
        for k, x in zip(b["key"], b["image"]):
            assert int((x * 255).round().max()) == 10 * int(k.rsplit("-", 1)[1])


def test_fast_and_webdataset_parsers_agree(bad_split):
    url, _ = bad_split
    data = Path(url, "shard-000000.tar").read_bytes()
    fast = list(tar_samples(io.BytesIO(data), "u", fast=True))
    slow = list(tar_samples(io.BytesIO(data), "u", fast=False))
    assert len(fast) == PER_SHARD and fast == slow
    truncated = Path(url, "shard-000001.tar").read_bytes()
    for fast_flag in (True, False):  # both raise on the cut; both yielded samples 0..10 first
        got = []
        with pytest.raises(tarfile.ReadError):
            for sample in tar_samples(io.BytesIO(truncated), "u", fast=fast_flag):
                got.append(sample["__key__"])
        assert got == [f"s1-{i:03d}" for i in range(CUT_AT - 1)]


def _stream(url: str, rank: int = 0, world_size: int = 1, max_bad: int = 100) -> ShardStream:
    config = StreamConfig(
        train_url=url,
        shuffle_buffer=8,
        max_pixels=1000,
        max_bad_samples=max_bad,
        retries=1,
        retry_backoff=0.0,
    )
    return ShardStream(config, rank=rank, world_size=world_size, batch_size=4)


def test_budget_carries_over_a_resume(bad_split):
    """A resumed epoch keeps counting its bad samples: 14 bad against a budget of 10 fails
    whether or not the epoch was interrupted (before the fix the resumed rank counted from 0)."""
    url, _ = bad_split
    first = _stream(url, max_bad=10)
    first.set_epoch(0)
    taken = 0
    for _batch in make_loader(first, num_workers=0):
        taken += 1
        if sum(first.bad_counts().values()) >= 4:
            break
    before = sum(first.bad_counts().values())
    assert 4 <= before <= 10 and taken < 10
    state = first.state_dict()
    assert state["bad_by_rank"] == [first.bad_counts()]

    resumed = _stream(url, max_bad=10)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert resumed.bad_counts() == first.bad_counts()
    with pytest.raises(BadDataError, match=r"1[1-4] bad samples in epoch 0 exceed"):
        list(make_loader(resumed, num_workers=0))

    # the control: the rest of the epoch alone stays within the budget
    fresh = _stream(url, max_bad=10)
    fresh.load_state_dict({**state, "bad_by_rank": []})
    fresh.set_epoch(0)
    assert len(list(make_loader(fresh, num_workers=0))) == 10 - taken
    assert sum(fresh.bad_counts().values()) == 14 - before


def test_budget_counts_follow_ranks_across_world_sizes(bad_split):
    url, _ = bad_split
    ranks = [_stream(url, r, 2) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
        list(make_loader(s, num_workers=0))
    counts = [s.bad_counts() for s in ranks]
    assert sum(sum(c.values()) for c in counts) == 14
    state = ranks[0].state_dict(counts)
    for r in range(2):  # same world size: each rank gets its own back
        s = _stream(url, r, 2)
        s.load_state_dict(state)
        assert s.bad_counts() == counts[r]
    one = _stream(url, 0, 1)  # one rank left: it carries the whole epoch's count
    one.load_state_dict(state)
    assert one.bad_counts() == dict(sum((Counter(c) for c in counts), Counter()))
    three = [_stream(url, r, 3) for r in range(3)]  # a new third rank starts at zero
    for s in three:
        s.load_state_dict(state)
    assert [s.bad_counts() for s in three] == [counts[0], counts[1], {}]


def test_fast_grouping_matches_webdatasets_on_awkward_names():
    # directories, dots in directories, upper-case and multi-part suffixes, a name with no
    # suffix, a hidden file, meta members, a key repeated after another key: group_members
    # must group exactly as webdataset's group_by_keys does
    members = [
        ("a/b.c/img.PNG", b"1"),
        ("a/b.c/img.cls", b"2"),
        ("noext", b"3"),
        ("dir/.hidden", b"4"),
        ("__meta__/x.png", b"5"),  # skipped, as webdataset skips meta members
        ("x.seg.png", b"6"),
        ("x.json", b"7"),
        ("y.png", b"8"),
        ("x.cls", b"9"),  # x again after y: a new sample, as in webdataset
    ]
    data = tar_bytes([members])
    fast = list(tar_samples(io.BytesIO(data), "u", fast=True))
    slow = list(tar_samples(io.BytesIO(data), "u", fast=False))
    assert fast == slow
    assert [s["__key__"] for s in fast] == ["a/b.c/img", "dir/", "x", "y", "x"]
    assert fast[0] == {"__key__": "a/b.c/img", "__url__": "u", "png": b"1", "cls": b"2"}
    assert fast[2] == {"__key__": "x", "__url__": "u", "seg.png": b"6", "json": b"7"}
    duplicate = tar_bytes([[("k.png", b"1"), ("k.PNG", b"2")]])
    for fast_flag in (True, False):
        with pytest.raises(ValueError, match="duplicate file name"):
            list(tar_samples(io.BytesIO(duplicate), "u", fast=fast_flag))


def test_header_checksum_is_tarfiles_sum():
    rng = random.Random(5)
    headers = [bytes(rng.getrandbits(8) for _ in range(512)) for _ in range(200)]
    headers += [b"\xff" * 512, b"\0" * 512, tar_bytes([[("k.png", b"x")]])[:512]]
    for header in headers:
        assert header_checksum(header) == sum(header[:148]) + 8 * 32 + sum(header[156:])


def test_header_byte_sums_in_lanes_are_exact():
    # 16-bit lanes hold 64 byte pairs of at most 510: all 0xFF is the largest case
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (300, 512), dtype=np.uint8)
    rows[0], rows[1] = 0xFF, 0
    want = rows.sum(1, dtype=np.int64)
    assert want[0] == 512 * 255
    assert np.array_equal(_byte_sums(rows.view(np.uint64)), want)


def test_a_corrupt_tar_header_ends_the_shard():
    data = bytearray(tar_bytes([good(f"k{i}", i) for i in range(6)]))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
        offset = t.getmember("k3.png").offset
    data[offset + 2] ^= 0x01  # one bit of k3.png's name: its header's checksum no longer holds
    got = []
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        for sample in tar_samples(io.BytesIO(bytes(data)), "u"):
            got.append(sample["__key__"])
    assert got == ["k0", "k1"]  # k2 was still being assembled when the tar broke


def test_an_image_under_another_formats_suffix_still_decodes():
    # the suffix's format is tried first (faster), then every format: a JPEG named .png
    buf = io.BytesIO()
    Image.new("L", (SIZE, SIZE), 77).save(buf, "JPEG")
    args = ((SIZE, SIZE), 1, False, "none", 10**6)
    as_png = decode_image(buf.getvalue(), *args, suffix="png")
    assert np.array_equal(as_png, decode_image(buf.getvalue(), *args, suffix="jpg"))
    assert abs(int(as_png.mean()) - 77) <= 1


@pytest.mark.parametrize("chunk", [512, 1000, 4096])
def test_ustar_files_buffering_does_not_change_members_or_cuts(bad_split, chunk):
    # members straddle the read buffer's edges at these chunk sizes; a cut shard raises at
    # the same member whatever the buffering
    url, _ = bad_split
    whole = Path(url, "shard-000000.tar").read_bytes()

    def members(data: bytes, size: int) -> list:
        out = []
        try:
            out += ustar_files(io.BytesIO(data), size)
        except tarfile.ReadError as e:
            out.append(("error", str(e)))
        return out

    reference = members(whole, 1 << 20)
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        assert [name for name, _ in reference] == t.getnames()
    assert members(whole, chunk) == reference
    for cut in (100, 512, 1500, len(whole) // 2, len(whole) - 1024 - 3):
        assert members(whole[:cut], chunk) == members(whole[:cut], 1 << 20)
    assert members(whole[:1500], chunk)[-1] == ("error", "unexpected end of data")


def test_labels_parse_with_whitespace_and_a_bad_one_is_counted():
    from pipeline.data.transforms import decode

    png = gray_png(3, SIZE)
    items = [
        {"__key__": "a", "png": png, "cls": b" 7\n"},
        {"__key__": "b", "png": png, "cls": b"seven"},
        {"__key__": "c", "png": png},
    ]
    out = list(
        decode(items, size=(SIZE, SIZE), channels=1, resize=False, crop="none", max_pixels=100)
    )
    assert out[0]["label"] == 7 and out[2]["label"] == -1
    assert (out[1]["bad"], out[1]["key"], out[1]["detail"]) == (
        "bad_label",
        "b",
        "bad_label: b'seven'",
    )


class _FailsAfter(io.RawIOBase):
    """A raw stream that hands out ``data``, then fails as a read past an S3 object's end does
    (the manifest's size is larger than the object)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= len(self.data):
            raise OSError("InvalidRange: the requested range is not satisfiable")
        n = min(len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_a_read_error_at_the_cut_keeps_the_members_before_it():
    data = tar_bytes([good(f"k{i}", i) for i in range(6)])
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        cut = t.getmember("k4.png").offset_data + 10
    got = []
    with pytest.raises(OSError, match="InvalidRange"):
        for sample in tar_samples(io.BufferedReader(_FailsAfter(data[:cut]), 1 << 20), "u"):
            got.append(sample["__key__"])
    assert got == ["k0", "k1", "k2"]  # k3 was still being assembled when the read failed


def _set_size_field(data: bytearray, offset: int, field: bytes) -> None:
    """Rewrite the size field of the header at ``offset`` and fix its checksum (as another
    tar writer would have written it)."""
    data[offset + 124 : offset + 136] = field
    data[offset + 148 : offset + 156] = b" " * 8
    data[offset + 148 : offset + 155] = b"%06o\0" % sum(data[offset : offset + 512])


@pytest.mark.parametrize("chunk", [512, 3000, 1 << 20])
def test_member_runs_found_at_once_match_tarfile_around_members_that_are_not_plain(chunk):
    # the run scan must give tarfile's members exactly: around a member whose data is a tar
    # (blocks that look like valid headers, 512-aligned), a name in the prefix field, a
    # directory, a size field ending in a space rather than a NUL (another writer's style)
    inner = tar_bytes([good(f"inner{i}", i) for i in range(3)])
    long_dir = "d" * 60 + "/" + "e" * 60
    members = [m for i in range(4) for m in good(f"k{i}", i)]
    members += [("nested.tar", inner), (f"{long_dir}/x.png", gray_png(3, SIZE)), ("adir/", None)]
    members += [m for i in range(4) for m in good(f"m{i}", i)]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    data = bytearray(out.getvalue())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
        offsets = {m.name.rstrip("/"): m.offset for m in t.getmembers()}
    _set_size_field(data, offsets["m1.png"], b"%011o " % len(dict(members)["m1.png"]))
    data = bytes(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        want = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]
    assert len(want) == 18 and want[8] == ("nested.tar", inner)
    assert want[9][0] == f"{long_dir}/x.png"
    assert list(ustar_files(io.BytesIO(data), chunk)) == want
    # the run from the start stops before the member holding the look-alike headers; none
    # starts at it, at the prefixed name or the directory; one from m0 stops at the
    # rewritten size field, and the one after m1 runs to the end
    names, _, _, end = scan_members(data, 0)
    assert names == [n for n, _ in members[:8]] and end == offsets["nested.tar"]
    for name in ("nested.tar", f"{long_dir}/x.png", "adir", "m1.png"):
        assert scan_members(data, offsets[name]) is None, name
    names, _, _, end = scan_members(data, offsets["m0.png"])
    assert names == ["m0.png", "m0.cls"] and end == offsets["m1.png"]
    names, offsets_, sizes, _ = scan_members(data, offsets["m1.cls"])
    assert names == ["m1.cls", "m2.png", "m2.cls", "m3.png", "m3.cls"]
    assert [data[a : a + n] for a, n in zip(offsets_, sizes)] == [p for _, p in members[-5:]]
