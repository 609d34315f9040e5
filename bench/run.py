"""``make bench``: the benchmarks of issue 7 in one run, results in ``bench/results.json`` and
``bench/results.md``; ``make bench-quality``: the model-quality table of issue 4 in
``bench/quality/`` (results.{json,md} and ``training_curve.png``).

    .venv/bin/python -m bench.run            # full: ~15 min on 2 cores
    .venv/bin/python -m bench.run --quick    # ~3-4 min, small N (stated in the output)
    .venv/bin/python -m bench.run --only data,sampling
    .venv/bin/python -m bench.run --render   # tables + curve again from results.json
    make bench-quality                       # the quality table alone (issue 17's protocol)
    .venv/bin/python -m bench.run --only quality --quality-smoke --out-dir /tmp/q  # ~2-3 min

Starts its own SeaweedFS, MLflow and Ray head on free loopback ports and stops exactly those
processes at the end (also on Ctrl-C / SIGTERM). Ratios are always against a baseline
measured in the same run; numbers are medians of interleaved repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("data", "train", "overhead", "sampling", "quality", "fixes", "sweep", "gpu")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "quality")
OUT_DIR = Path(__file__).resolve().parent


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _write(results: dict, out_dir: Path) -> None:
    from bench.report import markdown, training_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out_dir / "results.json")
    if "protocol" in results.get("quality", {}):
        training_curve(results["quality"], out_dir / "training_curve.png")
    (out_dir / "results.md").write_text(markdown(results))


QUALITY_BLOCK = "bench.quality"


def write_readme_quality(results: dict, readme: Path | None = None) -> None:
    """Rewrite the README's block between ``<!-- bench.quality -->`` and its end marker."""
    from bench.common import README, write_readme_block
    from bench.report import readme_quality

    q = results.get("quality", {})
    if "protocol" not in q:
        raise SystemExit("--readme: no protocol quality results to render")
    write_readme_block(QUALITY_BLOCK, readme_quality(q), readme or README)


def _gpu_section(log) -> dict:
    """The GPU path's numbers (img/s, peak GPU memory, data wait) from ``bench.gpu_check``, run
    as its own process with its own services; on a machine without CUDA, skipped with a line."""
    import subprocess

    import torch

    if not torch.cuda.is_available():
        log("gpu: skipped, no CUDA device on this machine (the sizing table needs a GPU run)")
        return {"skipped": "no CUDA device on this machine"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, timeout=900
    )
    keep = ("images/s", "peak GPU memory", "data-wait", "PASS", "FAIL", "gpu-check:")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(keep)]
    return {"device": torch.cuda.get_device_name(0), "returncode": done.returncode, "lines": lines}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small N, ~3-4 minutes")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections of {','.join(SECTIONS)} (default: all but "
        "quality, which has its own run: make bench-quality)",
    )
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where results.{json,md} go")
    p.add_argument(
        "--quality-minutes",
        type=float,
        default=None,
        help="CPU minutes of training per quality variant (default: 1, quick 1/6)",
    )
    p.add_argument(
        "--iwae-images",
        type=int,
        default=None,
        help="test images for the conv variant's IWAE-k (first N; the MLP is scored on all and "
        "on these; default 2000, quick 8)",
    )
    p.add_argument("--iwae-k", type=int, default=None, help="IWAE k on the test split (5000)")
    p.add_argument(
        "--quality-test-images",
        type=int,
        default=None,
        help="test images for the full-split numbers (default 0: all 10,000)",
    )
    p.add_argument(
        "--quality-smoke",
        action="store_true",
        help="the whole quality path in ~2-3 minutes: 8 CPU-s per variant, 500 test images, "
        "IWAE-20 on 16 (numbers meaningless; every protocol field written)",
    )
    p.add_argument(
        "--quality-variants",
        default="",
        help="run only these quality variants (comma-separated), side by side",
    )
    p.add_argument(
        "--readme",
        action="store_true",
        help="also rewrite README.md's quality block from the quality results",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="only re-render results.md and the curve from results.json",
    )
    args = p.parse_args(argv)
    if args.render:
        results = json.loads((Path(args.out_dir) / "results.json").read_text())
        _write(results, Path(args.out_dir))
        if args.readme:
            write_readme_quality(results)
        return 0
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    signal.signal(signal.SIGTERM, _interrupt)

    import torch

    from bench import common
    from bench.stack import BenchStack

    if args.quality_smoke:
        settings = common.Settings.quality_smoke()
    else:
        settings = common.Settings.quick() if args.quick else common.Settings.full()
    if args.quality_minutes is not None:
        settings.quality_cpu_seconds = args.quality_minutes * 60
    for name in ("iwae_images", "iwae_k", "quality_test_images"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    command = "make bench" if not argv else f".venv/bin/python -m bench.run {' '.join(argv)}"
    results: dict = {
        "meta": {
            "command": command,
            "mode": settings.mode,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": vars(settings),
            "sections": only,
        },
        "machine": common.machine(),
    }
    log(f"{settings.mode} mode, sections {only}; machine {results['machine']}")
    need_ray = bool({"train", "overhead", "sampling", "sweep"} & set(only))
    need_mlflow = bool({"train", "sweep"} & set(only))
    services = (
        BenchStack(num_cpus=4, with_ray=need_ray, with_mlflow=need_mlflow)
        if set(only) != {"quality"}  # the quality section needs no service
        else contextlib.nullcontext()
    )
    with services as stack, tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        if stack is not None:
            results["meta"]["service_startup_seconds"] = stack.startup_seconds
            log(f"services up: {stack.startup_seconds}")
        timings = results["meta"].setdefault("section_seconds", {})
        for section in only:
            with common.Stopwatch() as t:
                if section == "data":
                    from bench import data_path

                    results["data_path"] = data_path.run(
                        settings, Path(work), stack.bucket("bench-data"), log, stack.s3
                    )
                    results["s3_goal"] = data_path.measure_s3_goal(
                        settings, Path(work), stack.bucket("bench-data"), log, stack.s3
                    )
                elif section == "train":
                    from bench import train_path

                    results["train"] = train_path.end_to_end(settings, stack, log)
                elif section == "overhead":
                    from bench import train_path

                    results["overhead"] = train_path.overhead(settings, stack, log)
                elif section == "sampling":
                    from bench import sampling

                    stack.ray_init()
                    results["sampling"] = sampling.run(
                        settings,
                        stack.bucket("bench-samples"),
                        stack.started,
                        settings.threads,
                        log,
                    )
                elif section == "quality":
                    from bench import quality

                    some = [v for v in args.quality_variants.split(",") if v]
                    results["quality"] = quality.run(
                        settings,
                        log,
                        some or None,
                        save_dir=str(Path(args.out_dir) / "models"),
                        command=command,
                    )
                elif section == "fixes":
                    from bench import fixes

                    results["fixes"] = fixes.run(settings, results, Path(work), log)
                elif section == "sweep":
                    from bench import sweep

                    results["sweep"] = sweep.run(settings, stack, log)
                elif section == "gpu":
                    results["gpu"] = _gpu_section(log)
            timings[section] = round(t.seconds, 1)
            log(f"{section} done in {t.seconds:.0f}s")
            results["meta"]["runtime_minutes"] = round((time.perf_counter() - t0) / 60, 1)
            _write(results, Path(args.out_dir))
    results["meta"]["runtime_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    results["meta"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(results, Path(args.out_dir))
    if args.readme:
        write_readme_quality(results)
    log(
        f"done in {results['meta']['runtime_minutes']} min; wrote {args.out_dir}/results.json, "
        "results.md"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
