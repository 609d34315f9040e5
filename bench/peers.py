"""The data path beside LitData and MosaicML Streaming on the same images, in the same run
(issue 16; ``make bench-peers``). Writes ``bench/peers.json`` and ``bench/peers.md``.

Per dataset, the project's ingest writes the shards; the same encoded PNG/JPEG bytes, in the
same order, are then written once more as a LitData dataset (``litdata.optimize``) and as MDS
(``streaming.MDSWriter``), with the same samples per shard; so every row decodes the same bytes.
Each row times whole epochs, from constructing the dataset to the last batch (worker start-up
included), shuffle on, batches of uint8 ``(B, C, H, W)`` that the main process turns into
float32 in [0, 1]:

* ``memory``: the in-memory decode limit, the bytes from a Python list through a torch
  ``DataLoader(shuffle=True)`` (the same setup as the peers' rows, the same decode).
* ``project``: ``ShardStream`` + ``make_loader`` with the defaults (``shuffle_buffer: 1000``).
* ``litdata``: ``litdata.StreamingDataset(shuffle=True)`` + ``litdata.StreamingDataLoader``.
* ``mds``: ``streaming.StreamingDataset(shuffle=True)`` + a torch ``DataLoader``.

``memory`` and ``project`` run in a ``.venv`` subprocess, the peers in a ``.venv-peers`` one
(``make bench-peers-venv``; see :mod:`bench.peers_runner`); the repetitions are interleaved,
every loader at every worker count within one repetition, the order rotated each time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine, median, ratio, rnd
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.shards import tar_samples

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("memory", "project", "litdata", "mds")
NAMES = {
    "memory": "in-memory decode limit",
    "project": "this project (shards)",
    "litdata": "LitData",
    "mds": "MosaicML Streaming (MDS)",
}
PEER_SYSTEMS = ("litdata", "mds")


def datasets(quick: bool) -> dict:
    """name -> ingest options, images, batch size, samples per shard (every format alike)."""
    jpeg = dict(source="synthetic", synthetic_mode="RGB", encoding="jpeg", jpeg_quality=90)
    fmnist = 8192 if quick else 60000  # the whole train split
    n64, n256 = (4096, 1024) if quick else (16384, 4096)
    return {
        "fashion_mnist_28_png_L": (
            dict(source="fashion_mnist", encoding="png", limit=fmnist if quick else 0),
            fmnist,
            256,
            fmnist // 15,
        ),
        "synthetic_64_jpeg_RGB": (
            dict(**jpeg, synthetic_size=64, synthetic_count=n64, test_fraction=0.0),
            n64,
            256,
            n64 // 16,
        ),
        "synthetic_256_jpeg_RGB": (
            dict(**jpeg, synthetic_size=256, synthetic_count=n256, test_fraction=0.0),
            n256,
            64,
            n256 // 16,
        ),
    }


class Runner:
    """A :mod:`bench.peers_runner` subprocess in one venv; ``ask(**request)`` -> its answer."""

    def __init__(self, python: str):
        self.python = python
        self.proc = subprocess.Popen(
            [python, "-m", "bench.peers_runner"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.python} -m bench.peers_runner died on {request}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def prepare(name: str, spec: tuple, root: Path, peers: Runner, log) -> dict:
    """Project shards, the samples file, the LitData and MDS copies (each made once)."""
    options, count, _, per_shard = spec
    folder = root / name
    config = IngestConfig(
        output_url=str(folder / "project"), shard_samples=per_shard, workers=2, **options
    )
    manifest = ingest(config, progress=False)["train"]
    if manifest.count != count:
        raise RuntimeError(f"{name}: ingested {manifest.count} images, expected {count}")
    samples_file = folder / "samples.pkl"
    stamp = folder / "converted.json"
    want = {"count": count, "per_shard": per_shard, "manifest": manifest.url}
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        images, labels = [], []
        for i in range(len(manifest.shards)):
            with open(manifest.shard_url(i), "rb") as f:
                for s in tar_samples(f, manifest.shard_url(i)):
                    images.append(s.get("png") or s["jpg"])
                    labels.append(int(s.get("cls", b"-1")))
        mode = "L" if options.get("source") == "fashion_mnist" else options["synthetic_mode"]
        with open(samples_file, "wb") as f:
            pickle.dump({"images": images, "labels": labels, "mode": mode}, f)
        for system in PEER_SYSTEMS:
            took = peers.ask(
                op="convert",
                system=system,
                samples=str(samples_file),
                out=str(folder / system),
                per_chunk=per_shard,
            )
            log(f"{name}: wrote {system} in {took['seconds']:.1f} s")
        stamp.write_text(json.dumps(want))
    with open(samples_file, "rb") as f:
        images = pickle.load(f)["images"]
    index = {s: json.loads((folder / s / "index.json").read_text()) for s in PEER_SYSTEMS}
    return {
        "paths": {
            "samples": str(samples_file),
            "project": manifest.url,
            "litdata": str(folder / "litdata"),
            "mds": str(folder / "mds"),
        },
        "config": {
            "images": count,
            "image_bytes": round(sum(map(len, images)) / len(images)),
            "shards": {
                "project": len(manifest.shards),
                "litdata": len(index["litdata"]["chunks"]),
                "mds": len(index["mds"]["shards"]),
            },
        },
    }


def summarize(epochs: dict[str, list[dict]]) -> dict:
    rates = {k: [e["images"] / e["seconds"] for e in v] for k, v in epochs.items()}
    out = {
        "images_per_second": {k: rnd(median(v)) for k, v in rates.items()},
        "all_repeats": {k: [rnd(r) for r in v] for k, v in rates.items()},
        "images_per_epoch": {k: v[0]["images"] for k, v in epochs.items()},
        "first_batch_seconds": {
            k: round(median(e["first_batch_seconds"] for e in v), 3) for k, v in epochs.items()
        },
        "load_1min": {k: [round(e["load"], 2) for e in v] for k, v in epochs.items()},
    }
    med, ratios = out["images_per_second"], {}
    for key in med:
        system, workers = key.rsplit("_w", 1)
        if system != "memory":
            ratios[f"{system}_vs_memory_w{workers}"] = ratio(med[key], med[f"memory_w{workers}"])
        if system == "project":
            for peer in PEER_SYSTEMS:
                ratios[f"project_vs_{peer}_w{workers}"] = ratio(med[key], med[f"{peer}_w{workers}"])
    out["ratios"] = ratios
    return out


def run(args, log=print) -> dict:
    peers_python = ROOT / ".venv-peers/bin/python"
    if not peers_python.exists():
        raise SystemExit(f"{peers_python} missing: run `make bench-peers-venv`")
    specs = datasets(args.quick)
    project, peers = Runner(sys.executable), Runner(str(peers_python))
    runners = {"memory": project, "project": project, "litdata": peers, "mds": peers}
    started, t0, date0 = machine(), time.perf_counter(), time.time()
    try:
        data = {n: prepare(n, s, Path(args.work_dir), peers, log) for n, s in specs.items()}
        for name, spec in specs.items():  # warm-up: forkservers, imports, page cache
            for system in SYSTEMS:
                runners[system].ask(
                    op="epoch", system=system, data=data[name]["paths"], batch=spec[2], workers=1
                )
        epochs: dict[str, dict[str, list[dict]]] = {n: {} for n in specs}
        for rep in range(args.repeats):
            order = SYSTEMS[rep % len(SYSTEMS) :] + SYSTEMS[: rep % len(SYSTEMS)]
            for name, spec in specs.items():
                for workers in args.workers:
                    for system in order:
                        load = os.getloadavg()[0]
                        e = runners[system].ask(
                            op="epoch",
                            system=system,
                            data=data[name]["paths"],
                            batch=spec[2],
                            workers=workers,
                        )
                        epochs[name].setdefault(f"{system}_w{workers}", []).append(
                            {**e, "load": load}
                        )
            log(f"repetition {rep + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s)")
        versions = {"project": project.ask(op="versions"), "peers": peers.ask(op="versions")}
    finally:
        project.close()
        peers.close()
    loads = [e["load"] for d in epochs.values() for v in d.values() for e in v]
    return {
        "command": "make bench-peers" + (" (--quick)" if args.quick else ""),
        "machine": started,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "load_1min_during": {"min": min(loads), "median": median(loads), "max": max(loads)},
        "versions": versions,
        "repeats": args.repeats,
        "workers": args.workers,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(date0)),
        "git": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip(),
        "seconds": round(time.perf_counter() - t0),
        "datasets": {
            name: {
                "config": {**data[name]["config"], "batch_size": spec[2]},
                **summarize(epochs[name]),
            }
            for name, spec in specs.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)  # 3 left goals flipping from run to run
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts")
    p.add_argument("--quick", action="store_true", help="small datasets (a smoke run)")
    p.add_argument("--work-dir", default=str(ROOT / ".data/bench-peers"))
    p.add_argument("--out-dir", default=str(ROOT / "bench"))
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.quick:
        args.work_dir += "-quick"
    results = run(args)
    from bench.peers_report import markdown

    out = Path(args.out_dir)
    stem = "peers-quick" if args.quick else "peers"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {out / stem}.json and .md")
    if not args.quick and out.resolve() == (ROOT / "bench").resolve():
        from bench.common import write_readme_block
        from bench.peers_report import readme_block

        write_readme_block("bench.peers", readme_block(results))
        print("rewrote README.md's bench.peers block")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
