"""``make bench-readme``: the README's numbers, each from repeated runs, with their spread.

Runs, one after another on this machine:

- ``make bench``'s headline sections (data, train, overhead, sampling) ``--runs`` times, each
  a separate ``bench.run`` with its own services: the Performance table is the median of the
  runs' values and ratios, with their min-max;
- ``make demo`` (``infra/local/demo.sh``) ``--runs`` times, each on a fresh stack in a temp
  dir (stopped after): the demo's wall time and its held-out numbers from MLflow, median and
  min-max;
- ``bench.ingest_scale`` ``--runs`` times at ``--ingest-count`` images: img/s, peak RSS, the
  kill-and-resume check.

Writes ``bench/repeat.json`` and ``bench/repeat.md`` and rewrites the README's generated blocks
(between ``<!-- bench.repeat:NAME -->`` and ``<!-- /bench.repeat:NAME -->``) from them, so the
README holds exactly what the last run measured.

    .venv/bin/python -m bench.repeat                    # ~30 min on 2 cores
    .venv/bin/python -m bench.repeat --only demo --runs 3
    .venv/bin/python -m bench.repeat --render           # README blocks again from repeat.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_readme_block

ROOT = Path(__file__).resolve().parent.parent
OUT_JSON = ROOT / "bench" / "repeat.json"
OUT_MD = ROOT / "bench" / "repeat.md"
README = ROOT / "README.md"
PARTS = ("bench", "demo", "ingest")
BENCH_SECTIONS = "data,train,overhead,sampling"
# The demo's held-out metrics (MLflow keys) and how the README shows them.
DEMO_METRICS = {
    "eval/bits_per_dim": ("negative ELBO", "bits/dim", 3),
    "eval/neg_elbo_bits": ("negative ELBO", "bits/image", 0),
    "eval/rate_bits": ("rate KL(P_Ψ(z\\|y) ‖ N(0, I))", "bits/image", 1),
    "eval/distortion_bits": ("distortion −log₂ Q(y\\|z)", "bits/image", 0),
    "eval/active_units": ("active latent units", "of 32", 0),
    "eval/psnr": ("reconstruction PSNR", "dB", 1),
}


def log(message: str) -> None:
    print(f"[bench.repeat {time.strftime('%H:%M:%S')}] {message}", flush=True)


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "values": values,
    }


def fmt(s: dict, digits: int = 0, unit: str = "") -> str:
    """``median (min-max)``, e.g. ``1,064 (1,010-1,102) img/s``."""
    f = f"{{:,.{digits}f}}"
    u = f" {unit}" if unit else ""
    return f"{f.format(s['median'])}{u} ({f.format(s['min'])}-{f.format(s['max'])})"


def percent(s: dict) -> dict:
    return {**s, **{k: 100 * s[k] for k in ("median", "min", "max")}}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------ bench


def run_bench(runs: int, work: Path) -> dict:
    from bench.report import summary_numbers

    per_run, seconds = [], []
    for i in range(runs):
        out = work / f"bench{i}"
        log(f"bench run {i + 1}/{runs}: sections {BENCH_SECTIONS}")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bench.run", "--only", BENCH_SECTIONS, "--out-dir", str(out)]
        subprocess.run(cmd, cwd=ROOT, check=True)
        seconds.append(round(time.perf_counter() - t0, 1))
        per_run.append(summary_numbers(json.loads((out / "results.json").read_text())))
    rows = []
    for k, first in enumerate(per_run[0]):
        rows.append(
            {
                "label": first["label"],
                "unit": first["unit"],
                "baseline": first["baseline"],
                "value": spread([r[k]["value"] for r in per_run]),
                "base": spread([r[k]["base"] for r in per_run]),
                "ratio": spread([r[k]["ratio"] for r in per_run]),
            }
        )
    return {"sections": BENCH_SECTIONS, "run_seconds": seconds, "rows": rows}


def bench_block(b: dict) -> list[str]:
    out = [
        "| measurement | result | baseline (same run) | ratio |",
        "|---|---|---|---|",
    ]
    for r in b["rows"]:
        d = 1 if r["unit"] == "s" else 0
        out.append(
            f"| {r['label']} | {fmt(r['value'], d, r['unit'])} | {r['baseline']} "
            f"{fmt(r['base'], d, r['unit'] if r['unit'] == 's' else '')} | {fmt(r['ratio'], 2)} |"
        )
    n = len(b["run_seconds"])
    out += [
        "",
        f"Median (min-max) of {n} runs of `bench.run --only {b['sections']}`, each with its own "
        f"services; each run's own numbers are medians of its repetitions "
        f"([bench/results.md](bench/results.md) describes them). Runs took "
        f"{', '.join(f'{s:.0f}' for s in b['run_seconds'])} s.",
    ]
    return out


# ------------------------------------------------------------------------------- demo


def stack_env(state: Path) -> dict[str, str]:
    from pipeline.stack.local import read_env_file

    return read_env_file(state / "env")


def run_demo(runs: int, work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    walls, metrics, lines, example = [], {k: [] for k in DEMO_METRICS}, [], ""
    throughput, waits, steps = [], [], []
    for i in range(runs):
        state = work / f"stack{i}"
        env = {**os.environ, "PIPELINE_STACK_DIR": str(state)}
        log(f"demo run {i + 1}/{runs} (stack in {state})")
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                ["bash", "infra/local/demo.sh"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            walls.append(round(time.perf_counter() - t0, 1))
            (work / f"demo{i}.log").write_text(done.stdout + done.stderr)
            if done.returncode:
                raise RuntimeError(f"make demo failed (exit {done.returncode}): {work}/demo{i}.log")
            client = MlflowClient(stack_env(state)["MLFLOW_TRACKING_URI"])
            exp = client.get_experiment_by_name("vae-fashion-mnist")
            run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"])[0]
            for key in DEMO_METRICS:
                metrics[key].append(run.data.metrics[key])
            ips = client.get_metric_history(run.info.run_id, "data/images_per_second")
            wait = client.get_metric_history(run.info.run_id, "data/data_wait_fraction")
            loss = client.get_metric_history(run.info.run_id, "train/loss")
            steps.append(max(m.step for m in loss))
            throughput.append(statistics.median(m.value for m in ips))
            waits.append(statistics.median(m.value for m in wait))
            progress = [ln for ln in done.stdout.splitlines() if re.search(r"step \d+/\d+ \|", ln)]
            lines.append(len(progress))
            example = progress[-1].split("epoch", 1)[-1] if progress else ""
        finally:
            subprocess.run(
                [str(ROOT / ".venv/bin/pipeline"), "stack", "down"], cwd=ROOT, env=env, check=False
            )
            shutil.rmtree(state, ignore_errors=True)
    return {
        "wall_seconds": spread(walls),
        "steps": steps,
        "progress_lines": lines,
        "last_progress_line": f"epoch{example}",
        "images_per_second": spread(throughput),
        "data_wait_fraction": spread(waits),
        "metrics": {k: spread(v) for k, v in metrics.items()},
    }


def demo_block(d: dict) -> list[str]:
    n = d["wall_seconds"]["runs"]
    out = [
        f"| metric | median (min-max) of {n} runs | held-out images |",
        "|---|---|---|",
    ]
    for key, (label, unit, digits) in DEMO_METRICS.items():
        images = (
            "32 (`optim.iwae_images`)"
            if key in ("eval/active_units", "eval/psnr")
            else ("512 (`optim.eval_batches` 4 × 128)")
        )
        out.append(f"| {label} | {fmt(d['metrics'][key], digits, unit)} | {images} |")
    out += [
        f"| throughput, 2 workers (median over the run's log steps) | "
        f"{fmt(d['images_per_second'], 0, 'img/s')} | - |",
        f"| share of wall time waiting for data | {fmt(percent(d['data_wait_fraction']), 1, '%')} | - |",
        f"| the demo's wall time (`infra/local/demo.sh`, after install) | "
        f"{fmt(d['wall_seconds'], 0, 's')} | - |",
        "",
        f"Last logged training step per run: {', '.join(map(str, d['steps']))} (of 234; "
        f"`log_every: 20`); progress lines printed per run: "
        f"{', '.join(map(str, d['progress_lines']))} (steps 20, 40, ..., 220, each once); the "
        f"last run's last one: `{d['last_progress_line']}`.",
    ]
    return out


# ----------------------------------------------------------------------------- ingest


def run_ingest(runs: int, count: int, work: Path) -> dict:
    results = []
    for i in range(runs):
        out = work / f"ingest{i}.json"
        log(f"ingest run {i + 1}/{runs}: {count:,} images")
        cmd = [sys.executable, "-m", "bench.ingest_scale", "--count", str(count), "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"bench.ingest_scale failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(out.read_text()) | {"exit_code": done.returncode})
    return {
        "count": count,
        "shards": results[0]["shards"],
        "images_per_second": spread([r["images_per_second"] for r in results]),
        "wall_seconds": spread([r["wall_seconds"] for r in results]),
        "peak_rss_mib": spread([r["peak_rss_mib"]["main"] for r in results]),
        "killed_after_shards": [r["killed_after_shards"] for r in results],
        "rerun_kept_shards": [r["rerun_kept_shards"] for r in results],
        "rerun_identical": [r["rerun_identical"] for r in results],
        "exit_codes": [r["exit_code"] for r in results],
    }


def ingest_block(g: dict) -> list[str]:
    n = g["images_per_second"]["runs"]
    return [
        f"{g['count']:,} synthetic 28×28 PNG images into {g['shards']} shards with 2 encode "
        f"workers, {n} runs (median, min-max): **{fmt(g['images_per_second'], 0, 'img/s')}**, "
        f"{fmt(g['wall_seconds'], 1, 's')}, the ingest process's peak RSS "
        f"{fmt(g['peak_rss_mib'], 0, 'MiB')}. Each run was SIGKILLed after "
        f"{'/'.join(map(str, g['killed_after_shards']))} shards and re-run: it kept "
        f"{'/'.join(map(str, g['rerun_kept_shards']))} of them and produced the same shard "
        f"hashes ({'/'.join('yes' if x else 'NO' for x in g['rerun_identical'])})."
    ]


# ----------------------------------------------------------------------------- output

BLOCKS = {"bench": bench_block, "demo": demo_block, "ingest": ingest_block}


def render(results: dict) -> None:
    md = [f"# `make bench-readme` ({results['meta']['date']})", ""]
    for name, block in BLOCKS.items():
        if name not in results:
            continue
        lines = block(results[name])
        run = results[name].get("run")
        if run:
            lines += [
                "",
                f"Measured {run['date']} at commit {run['commit']}, load average (1, 5, 15 min) "
                f"{run['load_average_start']} at the start"
                + (f", {run['load_average_end']} at the end" if "load_average_end" in run else "")
                + " (2 cores).",
            ]
        md += [f"## {name}", "", *lines, ""]
        write_readme_block(f"bench.repeat:{name}", lines, README)
    meta = results["meta"]
    md += [
        f"Machine: {meta['machine']}; load average {meta['load_average_start']} at start, "
        f"{meta['load_average_end']} at end; command `{meta['command']}`; commit {meta['commit']}.",
    ]
    OUT_MD.write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    p.add_argument("--ingest-count", type=int, default=200_000)
    p.add_argument("--render", action="store_true", help="README blocks again from repeat.json")
    args = p.parse_args(argv)
    if args.render:
        render(json.loads(OUT_JSON.read_text()))
        return 0
    only = [x for x in args.only.split(",") if x]
    if set(only) - set(PARTS):
        p.error(f"--only takes {PARTS}")
    from bench.common import machine

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    results["meta"] = {
        "command": "make bench-readme"
        if argv is None and len(sys.argv) == 1
        else "python -m bench.repeat " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": commit,
        "runs": args.runs,
        "parts": only,
        "machine": machine(),
        "load_average_start": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-repeat-") as tmp:
        work = Path(tmp)
        for part in only:  # each part saved as soon as it is done, with when and where
            start = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit}
            start["load_average_start"] = load_average()
            if part == "demo":
                results["demo"] = run_demo(args.runs, work)
            elif part == "bench":
                results["bench"] = run_bench(args.runs, work)
            else:
                results["ingest"] = run_ingest(args.runs, args.ingest_count, work)
            results[part]["run"] = start | {"load_average_end": load_average()}
            results["meta"]["load_average_end"] = load_average()
            OUT_JSON.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    log(f"wrote {OUT_JSON}, {OUT_MD} and README's blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
