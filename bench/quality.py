"""5. Quality under issue 17's protocol: ``make bench-quality``.

1. Side by side: every variant (``bench.quality_train.VARIANTS``) starts in its own process
   at once, one torch thread each, and trains until its own process has spent the same CPU
   budget. Each process reads the Fashion-MNIST training split only, cuts the seeded
   validation split from it and makes every choice (candidate configuration, checkpoint) on
   validation numbers (``bench.quality_train``).
2. Test, once per reported number: when all training is done, the chosen models are scored on
   the test split by evaluation jobs over slices of it, one torch thread each, ``eval_workers``
   at a time. Bernoulli models see one fixed binarization of the whole test split
   (``binarize_fixed``; its sha256 is written). Reported: the MLP's IWAE-k NLL on every test
   image; the conv model's on the first ``iwae_images`` with the MLP's on the same images;
   the full-split ELBO of every variant; the 8-bit variant's ELBO bits/dim on the full split
   and IWAE bits/dim on the first ``bpd_iwae_images``.

The run metadata (validation split, binarization sha256, processes side by side and how long
they overlapped, CPU seconds and steps per variant, load average, machine, command, git commit)
is written by this code at run time under ``protocol``.

Resumable: the run takes hours on two cores, so nothing finished is lost when it is stopped.
The work directory (``save_dir``) keeps the trained models with their records
(``training.json``, keyed by the budget, the options and every variant's candidates) and each
finished evaluation job (``eval/*.json``, keyed by the weights' sha256). Running the same
command again reuses both and computes only what is missing; every invocation (its commit,
load, what it ran and what it reused) is listed under ``protocol.invocations``. Training is
all or nothing, so the variants always train side by side in one invocation. Delete the work
directory to start over.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import Settings, machine, rnd
from bench.quality_train import VARIANTS, CountingSource, select_and_train, training_splits
from pipeline.model.quality import TEST_BINARIZATION_SEED

LN2 = 0.6931471805599453
EVAL_BATCH = 8  # test images per evaluate() batch; with chunk 128: 1,024 decodes per call


def _options(settings: Settings) -> dict:
    return {
        "seed": 0,
        "val_size": settings.val_size,
        "val_seed": settings.val_seed,
        "select_k": settings.select_k,
        "select_images": settings.select_images,
        "select_fraction": settings.select_fraction,
        "checkpoints": settings.checkpoints,
    }


def train_variant(name: str, budget_s: float, opts: dict, save_dir: str) -> dict:
    """Process entry of one variant: validation split, selection, training; weights saved.

    Reads the training split only; ``splits_read`` in the result is the audit.
    """
    from pipeline.model import save_weights

    started = time.time()
    torch.set_num_threads(1)
    source = CountingSource()
    splits, split_meta = training_splits(source, opts["val_size"], opts["val_seed"])
    vae, record = select_and_train(name, splits["train"], splits["val"], budget_s, opts)
    path = Path(save_dir, f"{name}.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save_weights(vae, metadata={"model_config": json.dumps(asdict(vae.config))})
    _write_atomic(path, data)
    return {
        **record,
        "validation_split": split_meta,
        "splits_read": dict(source.reads),
        "process": {"pid": os.getpid(), "started": started, "finished": time.time()},
        "weights": str(path),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def _sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def training_key(budget: float, opts: dict, variants: list[str]) -> str:
    """What the trained models depend on: the budget, the options, each variant's candidates."""
    spec = {"budget": budget, "opts": opts, "variants": {v: asdict(VARIANTS[v]) for v in variants}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def reusable_training(path: Path, key: str) -> dict | None:
    """The training record at ``path`` if it was made under ``key`` and every weights file it
    names still has the sha256 it recorded; else None."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key:
        return None
    for r in record["variants"].values():
        if _sha256_file(Path(r["weights"])) != r["weights_sha256"]:
            return None
    return record


def test_jobs(variants: dict, settings: Settings) -> list[dict]:
    """The test-split evaluation jobs: (variant, number, image slice, k), cheapest first, so a
    run stopped midway has finished as many jobs as it could (each is kept; see the module)."""
    n_test = settings.quality_test_images or 10_000
    shard = settings.iwae_shard
    conv_n = min(settings.iwae_images, n_test)

    def slices(lo: int, hi: int) -> list[tuple[int, int]]:
        return [(a, min(a + shard, hi)) for a in range(lo, hi, shard)]

    jobs = []
    for name, r in variants.items():
        jobs.append({"variant": name, "number": "elbo_full", "slice": (0, n_test), "k": 1})
        if r["likelihood"] == "bernoulli":
            mlp = r["model_config"]["arch"] == "mlp"
            # the MLP covers every image, cut at conv_n so the conv's images are a sum of shards
            cuts = slices(0, conv_n) + (slices(conv_n, n_test) if mlp else [])
            for a, b in cuts:
                k = settings.iwae_k
                jobs.append({"variant": name, "number": "iwae", "slice": (a, b), "k": k})
        elif r["likelihood"] == "discretized_logistic":
            for a, b in slices(0, min(settings.bpd_iwae_images, n_test)):
                k = settings.bpd_iwae_k
                jobs.append({"variant": name, "number": "iwae", "slice": (a, b), "k": k})
    for j in jobs:
        r = variants[j["variant"]]
        j |= {"weights": r["weights"], "weights_sha256": r["weights_sha256"], "n_test": n_test}
        j["likelihood"] = r["likelihood"]
    cost = {"mlp": 1, "conv": 100}  # a conv decoder pass costs ~100 MLP passes here
    arch = {n: r["model_config"]["arch"] for n, r in variants.items()}
    jobs.sort(key=lambda j: (j["slice"][1] - j["slice"][0]) * j["k"] * cost[arch[j["variant"]]])
    return jobs


def job_file(eval_dir: Path, job: dict) -> Path:
    a, b = job["slice"]
    return eval_dir / f"{job['variant']}.{job['number']}.{a}-{b}.k{job['k']}.n{job['n_test']}.json"


def finished_job(path: Path, job: dict) -> dict | None:
    """The stored result of ``job`` if it scored these very weights; else None."""
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    return stored["result"] if stored.get("weights_sha256") == job["weights_sha256"] else None


def evaluate_on_test(job: dict) -> dict:
    """One test evaluation job: reads the test split, scores one slice of it, returns sums
    (also written to ``job["save"]`` when set, so a stopped run keeps it)."""
    from pipeline.model import evaluate, load_model, weights_metadata
    from pipeline.model.quality import binarization_sha256, binarize_fixed, quantize_8bit

    torch.set_num_threads(1)
    cpu0 = time.process_time()
    data = Path(job["weights"]).read_bytes()
    vae = load_model(json.loads(weights_metadata(data)["model_config"]), data)
    source = CountingSource()
    test = source.images("test")[: job["n_test"]]
    out: dict = {"job": {k: job[k] for k in ("variant", "number", "slice", "k")}}
    if job["likelihood"] == "bernoulli":
        images = binarize_fixed(test)  # the whole split at once: the same bits in every job
        out["test_binarization_sha256"] = binarization_sha256(images)
    else:
        images = quantize_8bit(test)
    a, b = job["slice"]
    g = torch.Generator().manual_seed(1_000_003 * (1 + a) + job["k"])  # the IWAE noise only
    r = evaluate(vae, list(images[a:b].split(EVAL_BATCH)), job["k"], chunk=128, generator=g)
    n = int(r["n_images"])
    out["sums"] = {k: v * n for k, v in r.items() if k not in ("active_units", "latent_units")}
    out["n"] = n
    if job["number"] == "elbo_full":
        out["active_units"], out["latent_units"] = r["active_units"], r["latent_units"]
    out["cpu_seconds"] = time.process_time() - cpu0
    out["splits_read"] = dict(source.reads)
    if job.get("save"):
        _write_json(Path(job["save"]), {"weights_sha256": job["weights_sha256"], "result": out})
    return out


def _mean(parts: list[dict], key: str) -> float:
    n = sum(p["n"] for p in parts)
    return sum(p["sums"][key] for p in parts) / n


def combine(variants: dict, results: list[dict], settings: Settings) -> None:
    """Fold the evaluation jobs' sums into each variant's ``test`` numbers."""
    n_test = settings.quality_test_images or 10_000
    conv_n = min(settings.iwae_images, n_test)
    for name, r in variants.items():
        mine = [x for x in results if x["job"]["variant"] == name]
        full = next(x for x in mine if x["job"]["number"] == "elbo_full")
        iwae = [x for x in mine if x["job"]["number"] == "iwae"]
        t = {
            "images": full["n"],
            "neg_elbo_nats": _mean([full], "neg_elbo"),
            "elbo_bits_per_dim": _mean([full], "elbo_bits_per_dim"),
            "rate_bits": _mean([full], "rate") / LN2,
            "distortion_bits": _mean([full], "distortion") / LN2,
            "psnr_db": _mean([full], "psnr"),
            "active_units": full["active_units"],
            "elbo_k": 1,
        }
        if r["likelihood"] == "bernoulli":
            mlp = r["model_config"]["arch"] == "mlp"
            same = [x for x in iwae if x["job"]["slice"][1] <= conv_n]
            t |= {
                "iwae_k": settings.iwae_k,
                "iwae_images": sum(x["n"] for x in iwae),
                "iwae_nll_nats": _mean(iwae, "nll_iwae"),
                "iwae_neg_elbo_nats": _mean(iwae, "neg_elbo"),  # k-draw ELBO, same images
                "iwae_gap_nats": _mean(iwae, "gap"),
            }
            if mlp:
                t["same_images_as_conv"] = {
                    "images": sum(x["n"] for x in same),
                    "iwae_nll_nats": _mean(same, "nll_iwae"),
                }
            shas = {x["test_binarization_sha256"] for x in mine}
            assert len(shas) == 1, shas  # one binarization, whatever the job, K or slice
            t["test_binarization_sha256"] = shas.pop()
        elif iwae:
            t |= {
                "iwae_k": settings.bpd_iwae_k,
                "iwae_images": sum(x["n"] for x in iwae),
                "iwae_bits_per_dim": _mean(iwae, "bits_per_dim"),
            }
        t["eval_cpu_seconds"] = round(sum(x["cpu_seconds"] for x in mine), 1)
        t["eval_jobs"] = len(mine)
        r["test"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}


def _git() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    # the code only: the run's own outputs (bench/quality/...) are not the code it ran
    dirty = git(
        "status", "--porcelain", "--untracked-files=no", "--", ":(glob)bench/**/*.py", "pipeline"
    )
    return {"commit": git("rev-parse", "HEAD"), "dirty_bench_or_pipeline": bool(dirty)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def train_side_by_side(variants: list[str], budget: float, opts: dict, work: Path, key: str):
    """Every variant in its own process, started together; the training record."""
    load, t0 = {"start": _load()}, time.time()
    date, git = _now(), _git()
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or state
    with ProcessPoolExecutor(len(variants), mp_context=ctx) as pool:
        futures = {v: pool.submit(train_variant, v, budget, opts, str(work)) for v in variants}
        out = {v: f.result() for v, f in futures.items()}
    load["after_training"] = _load()
    starts = [r["process"]["started"] for r in out.values()]
    ends = [r["process"]["finished"] for r in out.values()]
    return {
        "key": key,
        "date": date,
        "git": git,
        "load_average": load,
        "side_by_side": {
            "processes": len(variants),
            "torch_threads_each": 1,
            "start_spread_seconds": round(max(starts) - min(starts), 1),
            "all_running_seconds": round(min(ends) - max(starts), 1),  # all were running
            "training_wall_seconds": round(time.time() - t0, 1),
        },
        "variants": out,
    }


def evaluate_jobs(jobs: list[dict], eval_dir: Path, settings: Settings, log):
    """Every job's result, each finished one stored under ``eval_dir`` as it ends and reused
    when present; (results in job order, number of jobs run now)."""
    results: list[dict | None] = []
    for j in jobs:
        j["save"] = str(job_file(eval_dir, j))
        results.append(finished_job(Path(j["save"]), j))
    todo = [i for i, r in enumerate(results) if r is None]
    log(
        f"quality: {len(jobs)} test evaluation jobs, {len(jobs) - len(todo)} reused from {eval_dir}"
    )
    if todo:
        workers = min(settings.eval_workers or os.cpu_count() or 1, len(todo))
        ctx = multiprocessing.get_context("spawn")
        t0, cpu = time.time(), 0.0
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(evaluate_on_test, jobs[i]): i for i in todo}
            for n, f in enumerate(as_completed(futures), 1):
                i = futures[f]
                results[i] = f.result()
                cpu += results[i]["cpu_seconds"]
                j = jobs[i]
                log(
                    f"quality eval {n}/{len(todo)}: {j['variant']} {j['number']} "
                    f"images {j['slice'][0]}-{j['slice'][1]} k={j['k']} in "
                    f"{results[i]['cpu_seconds']:.0f} CPU-s ({time.time() - t0:.0f} s so far)"
                )
    return results, len(todo)


def run(
    settings: Settings,
    log=print,
    variants: list[str] | None = None,
    save_dir: str = "",
    command: str = "",
) -> dict:
    """Train ``variants`` (default: all) side by side, then score them on the test split;
    resumes from ``save_dir`` (see the module's docstring)."""
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown quality variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    work = Path(save_dir or "bench/quality/models")
    opts = _options(settings)
    budget = settings.quality_cpu_seconds
    host = machine()
    invocations_path = work / "invocations.json"
    invocations = json.loads(invocations_path.read_text()) if invocations_path.exists() else []
    this = {"started": _now(), "git": _git(), "command": command, "load_start": _load()}
    invocations.append(this)
    # [1] all variants at once, one process each, each stopped by its own CPU budget
    key = training_key(budget, opts, variants)
    trained = reusable_training(work / "training.json", key)
    if trained is None:
        _write_json(invocations_path, invocations)
        trained = train_side_by_side(variants, budget, opts, work, key)
        _write_json(work / "training.json", trained)
        this["training"] = "ran"
    else:
        log(
            f"quality: training reused from {work / 'training.json'} ({trained['date']}); "
            f"delete {work} to start over"
        )
        this["training"] = f"reused ({trained['date']})"
    this["load_after_training"] = _load()
    _write_json(invocations_path, invocations)
    out = {v: dict(r) for v, r in trained["variants"].items()}
    for v, r in out.items():
        c = r["cpu_seconds"]
        log(
            f"quality {v}: chose {r['chosen']['name']} on validation; {r['train']['steps']} "
            f"steps, {c['training_total']:.0f} training CPU-s ({c['selection_trials']:.0f} in "
            "trials)"
        )
    # [2] the test split, once per reported number, after all training and selection
    jobs = test_jobs(out, settings)
    results, todo = evaluate_jobs(jobs, work / "eval", settings, log)
    this |= {"eval_jobs_run": todo, "eval_jobs_reused": len(jobs) - todo}
    combine(out, results, settings)
    this |= {"finished": _now(), "load_end": _load()}
    _write_json(invocations_path, invocations)
    for v, r in out.items():
        log(f"quality {v}: test {r['test']}")
    split = next(iter(out.values()))["validation_split"]
    assert all(r["validation_split"] == split for r in out.values())
    sha = {r["test"].get("test_binarization_sha256") for r in out.values()} - {None}
    protocol = {
        "validation_split": split,
        "selection": "every choice (candidate, checkpoint) on validation numbers only; "
        "the chosen model is trained from scratch on the rest of the budget",
        "test_binarization": {
            "seed": TEST_BINARIZATION_SEED,
            "sha256": sha.pop() if len(sha) == 1 else sorted(sha),
            "images": settings.quality_test_images or 10_000,
        },
        "side_by_side": trained["side_by_side"],
        "test_split_reads": {
            "selection_and_training": sum(r["splits_read"].get("test", 0) for r in out.values()),
            "test_evaluation_jobs": sum(x["splits_read"].get("test", 0) for x in results),
            "reported_numbers": len({(j["variant"], j["number"]) for j in jobs}),
        },
        "eval": {
            "workers": min(settings.eval_workers or os.cpu_count() or 1, len(jobs)),
            "jobs": len(jobs),
            "cpu_seconds": round(sum(x["cpu_seconds"] for x in results), 1),
        },
        "training_load_average": trained["load_average"],
        "machine": host,
        "command": command,
        "git": trained["git"],
        "date": trained["date"],
        "invocations": invocations,
    }
    for r in out.values():
        r.pop("validation_split")
    return {
        "config": {
            "cpu_seconds_per_variant": budget,
            "cpu_minutes_per_variant": rnd(budget / 60, 2),
            "torch_threads": 1,
            "batch_size": 128,
            "processes_side_by_side": len(variants),
            "optimizer": "AdamW (candidate lr), 100 warm-up steps, cosine over the budget",
            "sigma_laplace_gaussian": 0.1,
            "data": "Fashion-MNIST: 55k train / 5k validation (from train) / test split",
            "test_images": settings.quality_test_images or 10_000,
            "iwae_k": settings.iwae_k,
            "iwae_images": settings.iwae_images,
            "bpd_iwae_k": settings.bpd_iwae_k,
            "bpd_iwae_images": settings.bpd_iwae_images,
            **opts,
        },
        "protocol": protocol,
        "variants": out,
    }
