"""``bench/peers.md`` from ``bench/peers.json`` (:mod:`bench.peers`)."""

from __future__ import annotations

SYSTEMS = ("memory", "project", "litdata", "mds")
NAMES = {
    "memory": "in-memory decode limit",
    "project": "**this project** (shards)",
    "litdata": "LitData",
    "mds": "MosaicML Streaming (MDS)",
}


def _rate(d: dict, key: str) -> str:
    runs = d["all_repeats"][key]
    return f"{d['images_per_second'][key]:,.0f} ({min(runs):,.0f}–{max(runs):,.0f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


GOAL_WORKERS = 2  # issue 16's goals are at 2 loader workers, shuffle on


def busy(r: dict) -> int:
    """Processes the bench itself keeps busy at its largest worker count (workers + main)."""
    return max(r["workers"]) + 1


def loaded(r: dict) -> bool:
    """Did the 1-min load exceed what the bench makes on its own (others shared the machine)?"""
    return r["load_1min_during"]["max"] > busy(r) + 0.5


def goals(
    r: dict,
    s3_vs_local: float | None = None,
    s3_label: str = "(make bench's datasets)",
    s3_spread: str = "-",
) -> list[str]:
    """Issue 16's goals per dataset at 2 loader workers, each a ratio of this run's medians:
    this project >= 0.9 of the in-memory limit, ahead of LitData and of MDS; with
    ``s3_vs_local`` (from ``make bench``, measured on ``s3_label``), S3 >= 0.95 of local
    shards. Beside each, the same ratio within each repetition (its epochs run close
    together), min-max: how far a slow or fast moment of the machine moves it (``s3_spread``
    for S3's pairs)."""
    w = GOAL_WORKERS
    if w not in r["workers"]:
        return []
    rows = []
    for name, d in r["datasets"].items():
        ra = d["ratios"]
        for key, label, bound in (
            ("project_vs_memory", "this project / in-memory limit", 0.9),
            ("project_vs_litdata", "this project / LitData", 1.0),
            ("project_vs_mds", "this project / MDS", 1.0),
        ):
            x = ra[f"{key}_w{w}"]
            met = x >= bound if bound < 1 else x > bound
            ours, theirs = key.split("_vs_")
            reps = d.get("all_repeats", {})
            pairs = sorted(
                a / b for a, b in zip(reps.get(f"{ours}_w{w}", []), reps.get(f"{theirs}_w{w}", []))
            )
            rows.append(
                [
                    name,
                    label,
                    f"{'>=' if bound < 1 else '>'} {bound}",
                    f"{x:.3f}",
                    "yes" if met else "no",
                    f"{pairs[0]:.2f}-{pairs[-1]:.2f}" if pairs else "-",
                ]
            )
    if s3_vs_local is not None:
        rows.append(
            [
                s3_label,
                "S3 / local shards",
                ">= 0.95",
                f"{s3_vs_local:.3f}",
                "yes" if s3_vs_local >= 0.95 else "no",
                s3_spread,
            ]
        )
    header = ["dataset", f"ratio at {w} loader workers", "goal", "measured", "met"]
    return _table([*header, "per repetition"], rows)


def markdown(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    workers = r["workers"]
    during = r["load_1min_during"]
    spread = max(
        max(runs) / min(runs)
        for d in r["datasets"].values()
        for runs in d["all_repeats"].values()
        if min(runs) > 0
    )
    shared = (
        f" **The 1-min load reached {during['max']:.1f} on {m['cores']} cores, above what the "
        f"bench itself makes ({busy(r):.0f}: its loader workers and main process), so other "
        f"work shared the machine; repetitions of one configuration differ by up to "
        f"{spread:.1f}x, so these medians and ratios establish nothing: rerun `make "
        "bench-peers` on a quiet machine.**"
        if loaded(r)
        else f" Repetitions of one configuration differ by up to {spread:.1f}x."
    )
    out = [
        "# The data path beside LitData and MosaicML Streaming",
        "",
        f"`{r['command']}` (`bench/peers.py`), {r.get('date', 'date not recorded')}, commit "
        f"`{str(r.get('git', '?'))[:10]}`, {r['seconds']} s. Machine: {m['cpu_model']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, no GPU. Load average (1, 5, 15 min) "
        f"{m['load_average_at_start']} at the start, {r['load_average_at_end']} at the end; "
        f"1-min load before each epoch: median {during['median']:.2f}, "
        f"{during['min']:.2f}–{during['max']:.2f}.{shared}",
        "",
        f"Versions: project venv torch {v['project']['torch']}, Pillow {v['project']['pillow']}, "
        f"simplejpeg {v['project'].get('simplejpeg', '-')}; "
        f"peers venv (`.venv-peers`, `requirements/bench-peers.txt`) torch {v['peers']['torch']}, "
        f"litdata {v['peers']['litdata']}, mosaicml-streaming {v['peers']['mosaicml-streaming']}, "
        f"numpy {v['peers']['numpy']}, Pillow {v['peers']['pillow']}, simplejpeg "
        f"{v['peers'].get('simplejpeg', '-')}; torchvision "
        f"{v['peers']['torchvision']}.",
        "",
        "Method: every loader reads the same encoded PNG/JPEG bytes (the project's ingest "
        "wrote them; the same bytes in the same order went into `litdata.optimize` and "
        "`streaming.MDSWriter`, with the same samples per shard). Images/s over whole epochs, "
        "timed from constructing the dataset to the last batch (worker start-up included), "
        "shuffle on for all (the project: its default `shuffle_buffer: 1000`; "
        "`StreamingDataset(shuffle=True)` for both peers); every loader yields uint8 batches and "
        "the main process turns them into float32 in [0, 1], with one torch thread (the "
        "default pool's spinning after each cast would take a core from the loader workers). Loader workers start as each "
        "library starts them: the project's from a forkserver, the others by fork. Every row "
        "decodes with the same calls: JPEGs with simplejpeg (the project's default "
        "`data.jpeg_decoder`), PNGs with Pillow (the format named, not probed for; the pixels "
        "by `tobytes()`); the project's `decode_image` adds its checks. So the ratios compare "
        "loaders, not decoders. The in-memory limit decodes the "
        "same bytes from a Python list through `DataLoader(shuffle=True)` with the same workers "
        "and batch size. `memory` and `project` run in a `.venv` subprocess, the peers in a "
        "`.venv-peers` one; each repetition runs every loader at every worker count, the order "
        f"rotated each repetition. Median of {r['repeats']} interleaved repetitions, "
        "(min–max) beside it; one warm-up epoch per loader and dataset first.",
        "",
        "### Images/s, median (min–max)",
        "",
    ]
    rows = []
    for name, d in r["datasets"].items():
        c = d["config"]
        shards = c["shards"]
        label = (
            f"{name} (N={c['images']:,}, batch {c['batch_size']}, ~{c['image_bytes']:,} B/img, "
            f"shards {shards['project']}/{shards['litdata']}/{shards['mds']})"
        )
        for s in SYSTEMS:
            rows.append([label, NAMES[s], *(_rate(d, f"{s}_w{w}") for w in workers)])
    out += _table(["dataset", "loader", *(f"workers={w}" for w in workers)], rows)
    out += [
        "",
        "Shards: project / LitData chunks / MDS shards. An epoch yields N rounded down to whole "
        "batches (LitData: every sample, its last batch partial).",
        "",
        "### Ratios (of the medians)",
        "",
    ]
    rows = []
    for name, d in r["datasets"].items():
        ra = d["ratios"]
        for key, label in (
            ("project_vs_memory", "this project / in-memory limit"),
            ("litdata_vs_memory", "LitData / in-memory limit"),
            ("mds_vs_memory", "MDS / in-memory limit"),
            ("project_vs_litdata", "this project / LitData"),
            ("project_vs_mds", "this project / MDS"),
        ):
            rows.append([name, label, *(f"{ra[f'{key}_w{w}']:.2f}" for w in workers)])
    out += _table(["dataset", "ratio", *(f"workers={w}" for w in workers)], rows)
    out += [
        "",
        "### Issue 16's goals (2 loader workers, shuffle on)",
        "",
        *goals(r),
        "",
        "### Time to the first batch, s (median)",
        "",
    ]
    rows = []
    for name, d in r["datasets"].items():
        for s in SYSTEMS:
            fb = d["first_batch_seconds"]
            rows.append([name, NAMES[s], *(f"{fb[f'{s}_w{w}']:.2f}" for w in workers)])
    out += _table(["dataset", "loader", *(f"workers={w}" for w in workers)], rows)
    return "\n".join(out) + "\n"


def readme_block(r: dict) -> list[str]:
    """README's ``bench.peers`` block: issue 16's goals from this run, with its provenance."""
    during = r["load_1min_during"]
    return [
        f"From `make bench-peers` ({r.get('date', 'date not recorded')}, commit "
        f"`{str(r.get('git', '?'))[:10]}`; {r['repeats']} interleaved repetitions of whole "
        f"epochs, worker start-up included; 1-min load {during['min']:.1f}-{during['max']:.1f}"
        f"{', shared with other work: these ratios establish nothing' if loaded(r) else ''}), "
        "ratios of medians at 2 loader workers, shuffle on:",
        "",
        *goals(r),
    ]
