"""Streaming: exactly-once epochs, equal batch counts, deterministic shuffle, exact resume.

Shards are tiny synthetic 8x8 images written into tmp_path; ranks are simulated by one
reader per rank in this process.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.plan import EpochPlan, Split, round_robin
from pipeline.data.stream import ShardStream, make_loader
from pipeline.data.transforms import batched, fill_bad

N = 230  # samples in 14 shards of 17 (the last holds 9)
B = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("syn"))
    manifests = ingest(
        IngestConfig(
            output_url=out,
            source="synthetic",
            synthetic_count=N,
            synthetic_size=8,
            shard_samples=17,
            test_fraction=0.0,
            workers=1,
        ),
        progress=False,
    )
    assert manifests["train"].count == N
    assert [s.samples for s in manifests["train"].shards] == [17] * 13 + [9]
    return f"{out}/train"


def stream(url: str, rank: int = 0, world_size: int = 1, batch_size: int = B, **cfg):
    config = StreamConfig(train_url=url, **{"shuffle_buffer": 20, **cfg})
    return ShardStream(config, rank=rank, world_size=world_size, batch_size=batch_size)


def keys_of(batches, drop_pad: bool = True) -> list[str]:
    return [k for b in batches for k, p in zip(b["key"], b["pad"].tolist()) if not (drop_pad and p)]


def epoch(url: str, world_size: int, workers: int, epoch_no: int = 0, **cfg):
    """Batches per rank of one epoch."""
    out = []
    for rank in range(world_size):
        s = stream(url, rank, world_size, **cfg)
        s.set_epoch(epoch_no)
        out.append(list(make_loader(s, num_workers=workers)))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_epoch_is_exact_and_balanced(shards, world_size, workers):
    per_rank = epoch(shards, world_size, workers)
    per_step = world_size * B
    expected_batches = N // per_step  # 28, 14, 9
    assert [len(b) for b in per_rank] == [expected_batches] * world_size
    keys = [k for batches in per_rank for k in keys_of(batches)]
    assert len(keys) == len(set(keys)) == N - N % per_step  # 224, 224, 216 samples
    assert all(b["image"].shape == (B, 1, 8, 8) for batches in per_rank for b in batches)
    batch = per_rank[0][0]
    assert batch["image"].dtype.is_floating_point
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["label"].tolist() != [-1] * B
    s = stream(shards, 0, world_size)
    assert s.stats()["dropped"] == N % per_step
    assert len(s) == expected_batches


@pytest.mark.parametrize("world_size,workers", [(2, 2), (3, 1)])
def test_pad_remainder_covers_every_sample(shards, world_size, workers):
    per_rank = epoch(shards, world_size, workers, remainder="pad")
    batches = -(-N // (world_size * B))  # 15, 10
    assert [len(b) for b in per_rank] == [batches] * world_size
    real = [k for b in per_rank for k in keys_of(b)]
    padded = [k for b in per_rank for k in keys_of(b, drop_pad=False)]
    assert len(real) == len(set(real)) == N
    assert len(padded) - len(real) == batches * world_size * B - N
    assert stream(shards, 0, world_size, remainder="pad").stats()["padded"] == len(padded) - N


def test_more_workers_than_batches_never_hangs(shards):
    # 230 samples, batch 100, 2 ranks: one batch per rank, two workers -> one worker idles
    per_rank = epoch(shards, 2, 2, batch_size=100)
    assert [len(b) for b in per_rank] == [1, 1]
    # a batch larger than a rank's share: zero batches everywhere, equal and finite
    assert [len(b) for b in epoch(shards, 3, 2, batch_size=100)] == [0, 0, 0]


def test_shuffle_differs_by_epoch_and_repeats_by_seed(shards):
    first = keys_of(epoch(shards, 1, 2, epoch_no=0)[0])
    again = keys_of(epoch(shards, 1, 2, epoch_no=0)[0])
    second = keys_of(epoch(shards, 1, 2, epoch_no=1)[0])
    other_seed = keys_of(epoch(shards, 1, 2, epoch_no=0, seed=1)[0])
    assert first == again
    assert first != second and len(second) == len(first) == 224
    assert first != other_seed
    assert sorted(first) != first  # shuffled, not ingest order


def test_passes_advance_epochs_without_set_epoch(shards):
    s = stream(shards)
    loader = make_loader(s, num_workers=0)
    a, b = keys_of(list(loader)), keys_of(list(loader))
    assert s.epoch == 1 and a != b
    assert b == keys_of(epoch(shards, 1, 0, epoch_no=1)[0])


@pytest.mark.parametrize("world_size,workers,k", [(2, 0, 5), (2, 2, 5), (3, 2, 5), (3, 2, 8)])
def test_resume_same_world_size_is_exact(shards, world_size, workers, k):
    # (3, 2, *): 9 batches per rank split 4 + 5 over the workers; k=8 resumes after worker 0
    # is exhausted, k=5 resumes with worker 1's turn next
    full = epoch(shards, world_size, workers)
    for rank in range(world_size):
        s = stream(shards, rank, world_size)
        loader = make_loader(s, num_workers=workers)
        consumed = []
        for batch in loader:
            consumed.append(batch)
            if len(consumed) == k:
                break
        state = loader.state_dict()
        assert state["batches"] == k and state["epoch"] == 0
        restored = stream(shards, rank, world_size)
        restored.load_state_dict(state)
        restored.set_epoch(0)  # what a training loop does at the top of an epoch: keeps position
        rest = list(make_loader(restored, num_workers=workers))
        assert len(rest) == len(full[rank]) - k == N // (world_size * B) - k
        assert keys_of(consumed) + keys_of(rest) == keys_of(full[rank])


def test_resume_with_other_world_size_and_workers(shards):
    k = 4
    full = {k_ for b in epoch(shards, 2, 2) for k_ in keys_of(b)}
    consumed, state = [], None
    for rank in range(2):
        loader = make_loader(stream(shards, rank, 2), num_workers=2)
        for i, batch in enumerate(loader):
            consumed += keys_of([batch])
            if i + 1 == k:
                break
        state = loader.state_dict()
    rest, counts, dropped = [], [], None
    for rank in range(3):
        s = stream(shards, rank, 3)
        s.load_state_dict(state)
        batches = list(make_loader(s, num_workers=1))
        counts.append(len(batches))
        rest += keys_of(batches)
        dropped = s.stats()["dropped"]
    # 224 planned - 2 ranks x 4 batches x 8 = 160 left; 3 ranks x 8: 6 batches each, 16 dropped
    assert counts == [6, 6, 6] and dropped == 16
    assert len(consumed) == 64 and len(rest) == 144
    everything = consumed + rest
    assert len(everything) == len(set(everything)) == 224 - 16
    assert set(everything) <= full


def test_resume_chain_over_three_layouts(shards):
    seen, state = [], None
    for world_size, workers, k in [(2, 2, 3), (3, 1, 2), (1, 0, None)]:
        for rank in range(world_size):
            s = stream(shards, rank, world_size)
            if state is not None:
                s.load_state_dict(state)
            loader = make_loader(s, num_workers=workers)
            for i, batch in enumerate(loader):
                seen += keys_of([batch])
                if k is not None and i + 1 == k:
                    break
            last = loader.state_dict()
        state = last
    # 224 planned; 2x3x8 = 48 taken; 176 left -> 3 ranks x 7 batches, 8 dropped; 3x2x8 = 48
    # taken; 120 left -> 15 batches on one rank
    assert len(seen) == len(set(seen)) == 48 + 48 + 120


def test_set_epoch_restarts_a_partial_pass(shards):
    # the eval pattern: set_epoch(0), take a few batches, later set_epoch(0) again
    s = stream(shards, shuffle_buffer=1)
    first = [b["key"] for _, b in zip(range(3), make_loader(s, num_workers=2))]
    s.set_epoch(0)
    again = [b["key"] for _, b in zip(range(3), make_loader(s, num_workers=2))]
    assert first == again
    rest = list(make_loader(s, num_workers=0))  # without set_epoch: continues the pass
    assert len(rest) == 28 - 3


def test_state_dict_rejects_another_dataset(shards):
    s = stream(shards)
    state = s.state_dict()
    with pytest.raises(Exception, match="seed"):
        stream(shards, seed=5).load_state_dict(state)


# ---------------------------------------------------------------------------- pure pieces


def test_round_robin_matches_dataloader_interleaving():
    # worker batches [2, 3]: w0 w1 w0 w1 w1
    assert [round_robin([2, 3], k) for k in range(6)] == [
        ([0, 0], 0),
        ([1, 0], 1),
        ([1, 1], 0),
        ([2, 1], 1),
        ([2, 2], 0),
        ([2, 3], 0),
    ]
    assert round_robin([0, 1], 1) == ([0, 1], 0)


def test_split_partitions_the_plan():
    split = Split(((0, 100),), world_size=3, num_workers=2, batch_size=4)
    assert split.batches == 8 and split.dropped == 4 and split.worker_batches() == [4, 4]
    covered = [
        p for r in range(3) for w in range(2) for a, b, _ in split.work(r, w) for p in range(a, b)
    ]
    assert covered == list(range(96))
    assert split.remaining(8) == []
    assert split.remaining(0) == [(0, 96)]


def test_plan_is_a_permutation_with_block_locality():
    plan = EpochPlan([5, 7, 3, 10], seed=3, epoch=1, block=4, shuffle=True)
    q = plan.stream_positions(0, plan.total)
    assert sorted(q.tolist()) == list(range(25))
    assert all(set(q[i : i + 4].tolist()) == set(range(i, min(i + 4, 25))) for i in range(0, 25, 4))
    shard, index = plan.locate(q)
    assert sorted(zip(shard.tolist(), index.tolist())) == [
        (s, i) for s, n in enumerate([5, 7, 3, 10]) for i in range(n)
    ]


def test_batched_and_fill_bad_on_plain_lists():
    assert list(batched([1, 2, 3, 4], 2)) == [[1, 2], [3, 4]]
    good = {"image": "img-a", "label": 1, "key": "a", "pad": False}
    bad = {"bad": "decode_error", "detail": "x", "key": "b", "url": "u", "pad": False}
    (out,) = fill_bad([[good, bad]], shape=(1, 2, 2))
    assert [x["key"] for x in out["items"]] == ["a", "a"]
    assert [x["pad"] for x in out["items"]] == [False, True]
    assert out["skipped"] == [{"bad": "decode_error", "detail": "x", "key": "b", "url": "u"}]


def test_batches_cross_from_workers_alike_inline_or_in_shared_memory(shards):
    # a batch's images travel in the pickled batch up to inline_batch_bytes, above it in
    # shared memory; the caller gets the same float32 tensors either way
    got = {}
    for inline in (0, 1 << 20):  # 8x8x3 x 8 = 1536 bytes a batch: shared memory, inline
        s = stream(shards)
        s.inline_batch_bytes = inline
        got[inline] = list(make_loader(s, num_workers=2))
    shared, inline = got[0], got[1 << 20]
    assert len(shared) == len(inline) == N // B
    for a, b in zip(shared, inline):
        assert a["key"] == b["key"]
        assert a["image"].dtype == b["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
