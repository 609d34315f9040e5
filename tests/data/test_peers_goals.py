"""Issue 16's goal table in bench/peers.md and bench/results.md: the right ratio against the
right bound, at 2 loader workers."""

from __future__ import annotations

import json

from bench.peers_report import goals
from bench.report import peers_section


def _peers(ratios_w2: dict[str, float]) -> dict:
    ratios = {f"{k}_w{w}": (v if w == 2 else 9.9) for k, v in ratios_w2.items() for w in (0, 2)}
    ips = {f"{s}_w{w}": 100.0 for s in ("memory", "project", "litdata", "mds") for w in (0, 2)}
    runs = {k: [90.0, 100.0, 110.0] for k in ips}
    d = {"config": {"images": 4096}, "ratios": ratios, "images_per_second": ips}
    return {
        "workers": [0, 2],
        "repeats": 3,
        "date": "2026-11-30",
        "load_1min_during": {"max": 1.2},
        "datasets": {"png28": {**d, "all_repeats": runs}},
    }


def test_goal_rows_compare_each_ratio_with_its_bound():
    p = _peers({"project_vs_memory": 0.9, "project_vs_litdata": 1.0, "project_vs_mds": 1.01})
    # per repetition: the project against each peer's 90, 100, 110 of the same repetition
    p["datasets"]["png28"]["all_repeats"]["project_w2"] = [99.0, 120.0, 88.0]
    p["datasets"]["png28"]["all_repeats"]["mds_w2"] = [45.0, 50.0, 55.0]
    rows = [r for r in goals(p, s3_vs_local=0.949) if r.startswith("| png28") or "S3" in r]
    assert rows == [
        "| png28 | this project / in-memory limit | >= 0.9 | 0.900 | yes | 0.80-1.20 |",
        "| png28 | this project / LitData | > 1.0 | 1.000 | no | 0.80-1.20 |",
        "| png28 | this project / MDS | > 1.0 | 1.010 | yes | 1.60-2.40 |",
        "| (make bench's datasets) | S3 / local shards | >= 0.95 | 0.949 | no | - |",
    ]


def test_results_md_takes_the_smallest_s3_ratio_and_flags_a_loaded_run(tmp_path):
    p = _peers({"project_vs_memory": 0.5, "project_vs_litdata": 2.0, "project_vs_mds": 2.0})
    p["load_1min_during"]["max"] = 5.0  # the bench itself makes ~3 (2 workers + main)
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(p))
    data = {"a": {"ratios": {"s3_vs_local_w2": 0.99}}, "b": {"ratios": {"s3_vs_local_w2": 0.93}}}
    text = "\n".join(peers_section({"data_path": data}, path))
    assert "| (make bench's datasets) | S3 / local shards | >= 0.95 | 0.930 | no |" in text
    assert "| png28 (N=4,096) | 100 (90-110) | 100 (90-110) | 100 (90-110) | 100 (90-110) |" in text
    assert "establish nothing" in text
    assert peers_section({"data_path": data}, tmp_path / "absent.json") == []


def test_a_load_the_bench_makes_itself_is_not_flagged():
    from bench.peers_report import loaded

    p = _peers({"project_vs_memory": 1.0, "project_vs_litdata": 1.0, "project_vs_mds": 1.0})
    for load, flagged in ((2.84, False), (3.5, False), (3.6, True), (8.0, True)):
        p["load_1min_during"]["max"] = load
        assert loaded(p) is flagged, load


def test_readme_peers_block_is_the_committed_run():
    """README's goal table is what ``make bench-peers`` rendered from bench/peers.json."""
    from bench.common import readme_block_pattern
    from bench.peers_report import readme_block
    from tests.helpers import ROOT

    block = readme_block_pattern("bench.peers").search((ROOT / "README.md").read_text())
    assert block, "README.md lacks the <!-- bench.peers --> block"
    committed = json.loads((ROOT / "bench" / "peers.json").read_text())
    assert block.group(0) == (
        block.group(1) + "\n".join(readme_block(committed)) + "\n" + block.group(2)
    )


def test_results_md_takes_the_s3_goal_measurement_when_the_run_has_one(tmp_path):
    """With section 1c (whole 60k epochs, paired), the goal row is its median pair ratio,
    not the short data-section epochs' smallest ratio."""
    from bench.report import s3_goal_section

    path = tmp_path / "peers.json"
    ratios = {"project_vs_memory": 1.0, "project_vs_litdata": 1.1, "project_vs_mds": 2.0}
    path.write_text(json.dumps(_peers(ratios)))
    pairs = [
        {"local": {"whole": 100.0, "first": 0.05}, "s3": {"whole": s3, "first": 0.1}}
        for s3 in (90.0, 96.0, 99.0)
    ]
    goal = {
        "config": {"images": 60000, "batch_size": 256, "workers": 2, "pairs": 3},
        "pairs": pairs,
        "whole_ratio": 0.96,
        "whole_ratio_min_max": [0.9, 0.99],
        "steady_ratio": 0.97,
        "steady_ratio_min_max": [0.92, 1.0],
        "server_cpu_seconds_per_epoch": 0.1,
        "s3_bytes_per_epoch": {"fetched": 146_968_576, "shards": 138_577_920},
    }
    data = {"a": {"ratios": {"s3_vs_local_w2": 0.5}}}
    text = "\n".join(peers_section({"data_path": data, "s3_goal": goal}, path))
    row = "| Fashion-MNIST (N=60,000, whole epochs, 3 pairs) | S3 / local shards | >= 0.95 |"
    assert f"{row} 0.960 | yes | 0.90-0.99 (pairs) |" in text
    section = "\n".join(s3_goal_section(goal))
    assert "| 1 | 100 | 90 | 0.900 | 0.050 | 0.100 |" in section
    assert "median **0.960** (min-max 0.900-0.990)" in section
    assert "asked for 147.0 MB; the shards hold 138.6 MB." in section
