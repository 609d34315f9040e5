"""Render the results: the markdown tables of ``bench/results.md`` and the training curve
PNG (drawn with Pillow, so ``make bench`` needs nothing beyond the project's dependencies)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PATHS = [
    ("memory", "decode from memory (per-core limit)"),
    ("local", "local shards"),
    ("s3", "S3 shards (SeaweedFS)"),
    ("folder", "folder, one file per image"),
]
LN2 = 0.6931471805599453
COLORS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
]


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _n(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def machine_section(r: dict) -> list[str]:
    m, meta = r["machine"], r["meta"]
    rows = [
        ["CPU", f"{m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}"],
        [
            "software",
            f"Python {m['python']}, torch {m['torch']}, ray {m['ray']}, "
            f"Pillow {m['pillow']}, Linux {m['kernel']}",
        ],
        ["date", meta["date"]],
        ["command", f"`{meta['command']}`"],
        ["mode", f"{meta['mode']} (runtime {meta['runtime_minutes']} min)"],
        [
            "load average",
            f"{m['load_average_at_start']} at start, {meta.get('load_average_at_end')} at end",
        ],
    ]
    return _table(["machine", ""], rows)


def data_section(d: dict) -> list[str]:
    first = next(iter(d.values()))
    workers = sorted({int(k.rsplit("_w", 1)[1]) for k in first["images_per_second"] if "_w" in k})
    out = [
        f"### 1. Data path, images/s (median of {first['config']['repeats']} interleaved "
        f"epochs; steady rate after the first batch; batch size per dataset below)",
        "",
    ]
    rows = []
    for name, res in d.items():
        c, ips = res["config"], res["images_per_second"]
        label = f"{name} (N={c['count']}, batch {c['batch_size']}, ~{c['image_bytes']:,} B/img)"
        for key, what in PATHS:
            if key == "memory":
                rows.append([label, what, _n(ips["memory"]), "", ""])
            else:
                rows.append([label, what, *(_n(ips.get(f"{key}_w{n}")) for n in workers)])
    out += _table(["dataset", "path", *(f"workers={n}" for n in workers)], rows)
    rows = []
    for name, res in d.items():
        q = res["ratios"]
        for key, what in (
            ("s3_vs_local", "S3 / local"),
            ("local_vs_limit", "local / limit"),
            ("shards_vs_folder", "shards / folder"),
        ):
            rows.append([name, what, *(_n(q.get(f"{key}_w{n}"), 2) for n in workers)])
    out += _table(["dataset", "ratio", *(f"workers={n}" for n in workers)], rows)
    server = [
        f"{name} {c['us_per_image']:.1f} us ({c['share_of_machine']:.0%}, {c['epochs']} epochs)"
        for name, res in d.items()
        if (c := res.get("s3_server_cpu"))
    ]
    if server:
        out += [
            "The S3 server (SeaweedFS) shares this machine's cores with the loader: its CPU "
            "per image served over all the S3 epochs of a dataset (its share of all the "
            "machine's CPU during them), a cost the local rows do not pay and a remote store "
            f"would not put on the loader's cores: {'; '.join(server)}.",
            "",
        ]
    out += [
        "The limit is one core decoding in-process; with 1-2 loader workers on 2 cores a "
        "ratio above 1 means the loader used more than one core. The consuming process casts "
        "the batches with one torch thread (the default pool spins after each cast, taking a "
        "core from the loader workers).",
        "",
        "Beside LitData and MosaicML Streaming on the same images (whole epochs, shuffle on, "
        "batch 256/64): [peers.md](peers.md) (`make bench-peers`).",
        "",
    ]
    return out


def train_section(t: dict) -> list[str]:
    c = t["config"]
    out = [
        f"### 2. End to end training, img/s (model {c['model']}, global batch "
        f"{c['global_batch']}, {c['torch_threads']} torch thread(s) per process, "
        f"{c['loader_workers_per_rank']} loader worker(s) per rank; {c['dataset']})",
        "",
    ]
    rows = [
        [
            "plain torch loop, in-memory tensors, 1 process",
            f"{_n(t['plain']['images_per_second'])} (reps {t['plain']['repeats']})",
            "1.00",
            "-",
            "-",
        ]
    ]
    for key, what, base in (
        ("ray_1w", "pipeline `run_training`, Ray Train 1 worker, S3 data", "plain"),
        ("ray_2w", "pipeline, 2 workers (DDP, gloo), same global batch", "1 worker"),
    ):
        r = t[key]
        q = t["ratios"]["ray_1w_vs_plain" if key == "ray_1w" else "ray_2w_vs_ray_1w"]
        rows.append(
            [
                what,
                _n(r["images_per_second"]),
                f"{q:.2f} (vs {base})",
                f"{r['data_wait_fraction']:.1%}",
                f"{r['wall_seconds']:.0f}",
            ]
        )
    out += _table(["run", "img/s", "ratio", "data wait", "wall s"], rows)
    out += [
        f"CPU seconds by process during the 1-worker run (wall {t['ray_1w']['wall_seconds']:.0f}"
        f" s, start-up included): {t['ray_1w']['cpu_seconds_by_process']}.",
        "",
    ]
    out += [
        f"Ray runs: {c['ray_steps']} steps each, steady rate = median of the later half of "
        f"the img/s points logged to MLflow every {c['log_every']} steps; plain loop: "
        f"{c['plain_repeats']} repetitions of {c['plain_steps']} steps bracketing the Ray "
        "runs, median of the later-half windows each, median over repetitions.",
        "",
    ]
    return out


def overhead_section(o: dict) -> list[str]:
    c = o["config"]
    out = [
        f"### 3. Ray Train overhead: the same minimal DDP loop (model {c['model']}, "
        f"{c['processes']} processes, gloo, global batch {c['global_batch']}, {c['steps']} "
        f"steps, {c['data']}), median of {c['repeats']} alternating repetition(s)",
        "",
    ]
    rows = []
    for key, what in (
        ("torchrun", "`torchrun --nproc_per_node 2`"),
        ("torchtrainer", "Ray Train `TorchTrainer`, 2 workers"),
    ):
        r = o[key]
        rows.append(
            [
                what,
                _n(r["images_per_second"]),
                f"{r['seconds_to_first_step']:.1f}",
                f"{r['wall_seconds']:.1f}",
                f"{r['cpu_seconds']:.1f}",
                str(r["repeats"]),
            ]
        )
    out += _table(
        [
            "launcher",
            "steady img/s",
            "s to first step (in worker)",
            "wall s",
            "CPU s (all processes)",
            "img/s per rep",
        ],
        rows,
    )
    q = o["ratios"]
    out += [
        f"TorchTrainer / torchrun: steady img/s {q['torchtrainer_vs_torchrun']:.2f}, "
        f"wall time {q['wall_torchtrainer_vs_torchrun']:.2f}, CPU time "
        f"{q['cpu_torchtrainer_vs_torchrun']:.2f}. CPU seconds by process under "
        f"TorchTrainer (last rep): {o['torchtrainer']['cpu_seconds_by_name_last_rep']}.",
        "",
    ]
    return out


def sampling_section(s: dict) -> list[str]:
    c, ips, q = s["config"], s["samples_per_second"], s["ratios"]
    out = [
        f"### 4. Sampling, samples/s (model {c['model']}, N={c['samples']}, batch "
        f"{c['batch_size']}, {c['torch_threads']} thread, median of {c['repeats']})",
        "",
    ]
    rows = [
        ["plain loop: z -> decoder -> mean", _n(ips["plain_decoder"]), "1.00"],
        [
            "`Sampler.__call__` in-process (seeded z per sample, PNG encode)",
            _n(ips["sampler_in_process"]),
            f"{q['sampler_vs_plain']:.2f}",
        ],
        [
            "`sample_large.generate` (Ray Data, 1 actor, shards to S3), wall",
            _n(ips["generate_ray_data"]),
            f"{q['generate_vs_plain']:.2f}",
        ],
        [
            "`generate`, its own clock (after the dataset is built)",
            _n(ips["generate_after_start"]),
            f"{q['generate_after_start_vs_plain']:.2f}",
        ],
        [
            "`generate` with `num_actors: 2` (2 cores; not the same threads)",
            _n(ips["generate_2_actors"]),
            f"{ips['generate_2_actors'] / ips['plain_decoder']:.2f}",
        ],
    ]
    cpu = s["cpu_seconds"]
    return (
        out
        + _table(["path", "samples/s", "vs plain"], rows)
        + [
            f"CPU seconds for the N samples: plain loop {cpu['plain_decoder']}, `generate` "
            f"{cpu['generate_ray_data']} (all our processes: actor start-up, Ray Data, driver "
            f"writing shards), with 2 actors {cpu['generate_2_actors']}.",
            "",
        ]
    )


def _quality_metric(name: str, r: dict, conv_images: int | None) -> str:
    e = r["test"]
    if r["likelihood"] == "bernoulli":
        text = (
            f"binarized NLL **{e['iwae_nll_nats']:.2f} nats** (IWAE-{e['iwae_k']}, "
            f"{e['iwae_images']} test images); -ELBO {e['neg_elbo_nats']:.2f} (all "
            f"{e['images']})"
        )
        same = e.get("same_images_as_conv")
        if same and conv_images and same["images"] < e["iwae_images"]:
            text += f"; on the conv's {same['images']}: {same['iwae_nll_nats']:.2f}"
        return text
    if "iwae_bits_per_dim" in e:
        return (
            f"**{e['elbo_bits_per_dim']:.3f} bits/dim** (ELBO, {e['images']} test images); "
            f"{e['iwae_bits_per_dim']:.3f} (IWAE-{e['iwae_k']}, {e['iwae_images']} images)"
        )
    return f"{e['elbo_bits_per_dim']:.3f} bits/dim (ELBO), PSNR {e['psnr_db']:.1f} dB"


def _invocations(runs: list[dict]) -> list[str]:
    """One line per invocation of a resumed run: when, at which commit, what it did."""
    if len(runs) < 2:
        return []
    out = ["Resumed run, one line per invocation:", ""]
    for i, r in enumerate(runs, 1):
        done = r.get("finished", "stopped before the end")
        evals = (
            f"{r['eval_jobs_run']} test jobs run, {r['eval_jobs_reused']} reused"
            if "eval_jobs_run" in r
            else "stopped during the test evaluation (its finished jobs kept)"
        )
        out.append(
            f"{i}. {r['started']} to {done}, git `{r['git']['commit'][:10]}`: training "
            f"{r.get('training', 'stopped')}; {evals}"
        )
    return [*out, ""]


# issue 17's goals: (variant, test number, at most, CPU-minutes, what)
QUALITY_GOALS = (
    ("bernoulli_mlp", "iwae_nll_nats", 228.7, 30, "binarized NLL, nats (published MLP VAE)"),
    ("bernoulli", "iwae_nll_nats", 225.4, 60, "binarized NLL, nats (published ConvHVAE)"),
    ("discretized_logistic", "elbo_bits_per_dim", 3.0, 60, "8-bit bits/dim (ELBO)"),
)


def readme_quality(q: dict) -> list[str]:
    """The README's quality block: each goal beside what this run reached, then the variants'
    table; rendered from ``bench/quality/results.json`` by ``make bench-quality``."""
    c, v, p = q["config"], q["variants"], q["protocol"]
    minutes = c["cpu_minutes_per_variant"]
    rows = []
    for name, key, target, goal_minutes, what in QUALITY_GOALS:
        if name not in v:
            continue
        e = v[name]["test"]
        images = e["iwae_images"] if key == "iwae_nll_nats" else e["images"]
        how = f"IWAE-{e['iwae_k']}" if key == "iwae_nll_nats" else "ELBO"
        reached = e[key]
        budget = f"{goal_minutes}" + ("" if goal_minutes == minutes else f" (ran {minutes:g})")
        rows.append(
            [
                name,
                what,
                budget,
                f"<= {target}",
                f"**{reached:.2f}**" if key == "iwae_nll_nats" else f"**{reached:.3f}**",
                f"{how}, {images:,} test images",
                "yes" if reached <= target else "no",
            ]
        )
    out = [
        f"From one `make bench-quality` ({p['date']}, trained at commit "
        f"`{p['git']['commit'][:10]}`; {len(p['invocations'])} invocation(s)): "
        f"{p['side_by_side']['processes']} variants side by side, {minutes:g} CPU-minutes "
        "each, one thread, selection on the validation split; test split once per number, "
        f"binarization sha256 `{str(p['test_binarization']['sha256'])[:16]}`.",
        "",
    ]
    out += _table(["variant", "goal", "CPU-min", "target", "reached", "measured on", "met"], rows)
    # the variants' table, selection trials and protocol line; links relative to the README
    rest = quality_section(q)[2:]
    return out + [
        x.replace("](training_curve.png)", "](bench/quality/training_curve.png)") for x in rest
    ]


def quality_section(q: dict) -> list[str]:
    if "protocol" not in q:
        return [
            "### 5. Quality",
            "",
            "Recorded before issue 17's protocol (no validation split, not side by side): "
            "kept in results.json as a record only.",
            "",
        ]
    c, v, p = q["config"], q["variants"], q["protocol"]
    side = p["side_by_side"]
    out = [
        f"### 5. Quality after {c['cpu_minutes_per_variant']} CPU-minutes of training per "
        f"variant ({c['cpu_seconds_per_variant']:.0f} CPU-s incl. selection trials, 1 thread, "
        f"{side['processes']} processes side by side, all running for "
        f"{side['all_running_seconds']:.0f} s; batch {c['batch_size']}, {c['optimizer']}; "
        "validation scoring and test evaluation not counted)",
        "",
    ]
    conv_n = next(
        (
            r["test"]["iwae_images"]
            for r in v.values()
            if r["likelihood"] == "bernoulli" and r["model_config"]["arch"] == "conv"
        ),
        None,
    )
    rows = []
    for name, r in v.items():
        t, e = r["train"], r["test"]
        rows.append(
            [
                name,
                r["chosen"]["name"],
                t["steps"],
                f"{t['epochs']:.1f}",
                f"{r['cpu_seconds']['training_total']:.0f}",
                _quality_metric(name, r, conv_n),
                f"{e['rate_bits']:.1f}",
                f"{e['distortion_bits']:.1f}",
                f"{e['psnr_db']:.1f}",
            ]
        )
    out += _table(
        [
            "variant",
            "chosen on validation",
            "final steps",
            "epochs",
            "CPU s",
            "test",
            "rate bits",
            "distortion bits",
            "PSNR dB",
        ],
        rows,
    )
    sel = []
    for name, r in v.items():
        for trial in r["selection"]:
            sel.append(
                [
                    name,
                    trial["candidate"]["name"],
                    trial["train"]["steps"],
                    f"{trial['train']['cpu_seconds']:.0f}",
                    f"{trial['validation']['score']:.2f}",
                    "chosen" if trial["candidate"]["name"] == r["chosen"]["name"] else "",
                ]
            )
    if sel:
        out += ["Selection trials (validation only; lower is better):", ""]
        out += _table(["variant", "candidate", "steps", "CPU s", "validation score", ""], sel)
    split, tb = p["validation_split"], p["test_binarization"]
    reads = p["test_split_reads"]
    out += [
        f"Protocol: validation = {split['size']} of the 60,000 training images (seed "
        f"{split['seed']}, indices sha256 `{split['indices_sha256'][:16]}`); test binarization "
        f"seed {tb['seed']}, sha256 `{str(tb['sha256'])[:16]}`; test split read "
        f"{reads['selection_and_training']} times during selection and training, "
        f"{reads['test_evaluation_jobs']} evaluation jobs for {reads['reported_numbers']} "
        f"reported numbers; trained at git `{p['git']['commit'][:10]}`; load average "
        f"{p['training_load_average']['start']} at start, "
        f"{p['training_load_average']['after_training']} after training.",
        "",
        *_invocations(p["invocations"]),
        "Published binarized Fashion-MNIST test NLL (Exemplar VAE, Norouzi et al. 2020): "
        "MLP VAE with a Gaussian prior 228.7 nats, conv hierarchical VAE 225.4 nats, after "
        "training to convergence (thousands of epochs). laplace = L1 and gaussian = L2 "
        f"distortion (fixed sigma {c['sigma_laplace_gaussian']}); bits/dim are 8-bit "
        "(continuous densities get the ln 255 bin width); PSNR of the reconstruction from "
        "the posterior mean. Training curve: ![training curve](training_curve.png)",
        "",
    ]
    return out


def fixes_section(f: dict) -> list[str]:
    out = ["### Top bottlenecks: before / after (measured in the same run, interleaved)", ""]
    rows = [
        [
            x["bottleneck"],
            x["what"],
            _n(x["before"], 1),
            _n(x["after"], 1),
            f"{x['after'] / x['before']:.2f}",
            x["where"],
        ]
        for x in f["items"]
    ]
    return out + _table(
        ["bottleneck", "measured", "before", "after", "after / before", "fix"], rows
    )


def summary_numbers(r: dict) -> list[dict]:
    """The headline measurements of one run as numbers: ``label``, ``value`` and ``unit``,
    ``baseline`` (its label) and ``base`` (its value, same run), ``ratio``. The README's
    Performance table is the median of these over repeated runs (``bench.repeat``)."""

    def row(label, value, unit, baseline, base, ratio):
        return dict(label=label, value=value, unit=unit, baseline=baseline, base=base, ratio=ratio)

    rows = []
    d = r.get("data_path", {}).get("fashion_mnist_28_png_L")
    goal = r.get("s3_goal")
    if d:
        ips, q = d["images_per_second"], d["ratios"]
        s3_row = (
            row(
                "data: S3 / local shards, 2 loader workers, whole 60k epochs",
                goal["images_per_second"]["s3"],
                "img/s",
                "local",
                goal["images_per_second"]["local"],
                goal["whole_ratio"],
            )
            if goal
            else row(
                "data: S3 / local shards, 2 loader workers",
                ips["s3_w2"],
                "img/s",
                "local",
                ips["local_w2"],
                q["s3_vs_local_w2"],
            )
        )
        rows += [
            row(
                "data: Fashion-MNIST local shards, in-process",
                ips["local_w0"],
                "img/s",
                "decode from memory",
                ips["memory"],
                q["local_vs_limit_w0"],
            ),
            s3_row,
            row(
                "data: shards / folder of files, 2 loader workers",
                ips["local_w2"],
                "img/s",
                "folder",
                ips["folder_w2"],
                q["shards_vs_folder_w2"],
            ),
        ]
    t = r.get("train")
    if t:
        one, two = t["ray_1w"]["images_per_second"], t["ray_2w"]["images_per_second"]
        rows += [
            row(
                "train: pipeline, Ray Train 1 worker, data from S3",
                one,
                "img/s",
                "plain loop",
                t["plain"]["images_per_second"],
                t["ratios"]["ray_1w_vs_plain"],
            ),
            row(
                "train: 2 DDP workers vs 1, same global batch",
                two,
                "img/s",
                "1 worker",
                one,
                t["ratios"]["ray_2w_vs_ray_1w"],
            ),
        ]
    o = r.get("overhead")
    if o:
        tt, tr = o["torchtrainer"], o["torchrun"]
        rows += [
            row(
                "Ray Train overhead: TorchTrainer vs torchrun, steady img/s",
                tt["images_per_second"],
                "img/s",
                "torchrun",
                tr["images_per_second"],
                o["ratios"]["torchtrainer_vs_torchrun"],
            ),
            row(
                "Ray Train overhead: wall time of the same run",
                tt["wall_seconds"],
                "s",
                "torchrun",
                tr["wall_seconds"],
                o["ratios"]["wall_torchtrainer_vs_torchrun"],
            ),
        ]
    s = r.get("sampling")
    if s:
        ips = s["samples_per_second"]
        rows.append(
            row(
                f"sampling: `generate` (Ray Data), N={s['config']['samples']}",
                ips["generate_ray_data"],
                "samples/s",
                "plain decoder loop",
                ips["plain_decoder"],
                s["ratios"]["generate_vs_plain"],
            )
        )
    return rows


def _value(x: float, unit: str) -> str:
    return f"{x:.1f} s" if unit == "s" else f"{_n(x)} {unit}"


def summary_section(r: dict) -> list[str]:
    """The headline ratios, each against its baseline from the same run (README table)."""
    rows = []
    for x in summary_numbers(r):
        base = f"{x['base']:.1f} s" if x["unit"] == "s" else _n(x["base"])
        rows.append(
            [
                x["label"],
                _value(x["value"], x["unit"]),
                f"{x['baseline']} {base}",
                f"{x['ratio']:.2f}",
            ]
        )
    q = r.get("quality")
    if q and "protocol" in q:  # only numbers measured under issue 17's protocol
        v, mins = q["variants"], q["config"]["cpu_minutes_per_variant"]
        for name, r_ in v.items():
            e = r_["test"]
            if r_["likelihood"] == "bernoulli":
                mlp = r_["model_config"]["arch"] == "mlp"
                rows.append(
                    [
                        f"quality after {mins} CPU-min: binarized NLL, "
                        f"{'MLP' if mlp else 'conv'} VAE ({name}, nats)",
                        f"{e['iwae_nll_nats']:.1f} (IWAE-{e['iwae_k']}, {e['iwae_images']} "
                        "test images)",
                        "published MLP VAE: 228.7" if mlp else "published ConvHVAE: 225.4",
                        f"{e['iwae_nll_nats'] / (228.7 if mlp else 225.4):.3f}",
                    ]
                )
            elif "iwae_bits_per_dim" in e:
                rows.append(
                    [
                        f"quality after {mins} CPU-min: Fashion-MNIST 8-bit bits/dim",
                        f"{e['elbo_bits_per_dim']:.3f} (ELBO, {e['images']} test)",
                        f"IWAE-{e['iwae_k']}, {e['iwae_images']} images: "
                        f"{e['iwae_bits_per_dim']:.3f}",
                        "-",
                    ]
                )
            else:
                rows.append(
                    [
                        f"quality after {mins} CPU-min: {name} rate / distortion",
                        f"{e['rate_bits']:.1f} / {e['distortion_bits']:.1f} bits",
                        f"PSNR {e['psnr_db']:.1f} dB",
                        "-",
                    ]
                )
    if not rows:
        return []
    m, meta = r["machine"], r["meta"]
    head = [
        f"### Summary (`{meta['command']}`, {meta['mode']} mode, {meta['date']}, "
        f"{m['cpu_model']} x{m['cores']} cores, torch {m['torch']}, ray {m['ray']})",
        "",
    ]
    return head + _table(["measurement", "result", "baseline (same run)", "ratio"], rows)


def sweep_section(s: dict) -> list[str]:
    c = s["config"]
    out = [
        f"### 8. Rate-distortion sweep: {len(c['kl_weights'])} points as Ray Tune trials "
        f"against the same points one after another ({c['steps_per_point']} steps each, "
        f"{c['workers_per_point']} worker per point, batch {c['batch']}, Ray head with "
        f"{c['ray_cpus']} CPUs)",
        "",
    ]
    out += _table(
        ["run", "wall s", "ratio"],
        [
            ["`pipeline sweep` (Tune, trials concurrent)", f"{s['sweep_wall_seconds']:.0f}", "-"],
            [
                "`run_training` per point, one after another (median of "
                f"{len(s['sequential_runs_seconds'])} runs bracketing the sweep)",
                f"{s['sequential_wall_seconds']:.0f}",
                f"sequential / sweep = {s['speedup']:.2f}",
            ],
        ],
    )
    out += _table(
        ["KL weight", "rate bits", "distortion bits", "-ELBO bits"],
        [
            [f"{p['kl_weight']:g}", p["rate_bits"], p["distortion_bits"], p["neg_elbo_bits"]]
            for p in s["points"]
        ],
    )
    out += [
        f"ELBO-optimal point: {s['best']}. Wall times include Ray/Tune start-up; trials can only "
        "run side by side on the cores the machine has (see the machine line above).",
        "",
    ]
    return out


def gpu_section(g: dict) -> list[str]:
    """``make gpu-check``'s numbers on a CUDA machine, or why the section was skipped."""
    out = ["## GPU path (`bench.gpu_check`, one GPU)", ""]
    if "skipped" in g:
        return out + [f"Skipped: {g['skipped']}.", ""]
    return out + [
        f"Device: {g['device']} (exit {g['returncode']})",
        "",
        "```",
        *g["lines"],
        "```",
        "",
    ]


PEERS_JSON = Path(__file__).resolve().parent / "peers.json"


def peers_section(r: dict, peers_json: Path = PEERS_JSON) -> list[str]:
    """The peers' rows (``make bench-peers``'s last run, bench/peers.json) and issue 16's
    goals, with S3 / local shards at 2 loader workers from this run's data section."""
    from bench.peers_report import GOAL_WORKERS, goals, loaded

    if not peers_json.exists():
        return []
    p = json.loads(peers_json.read_text())
    goal = r.get("s3_goal")
    if goal:  # measured for the goal: whole epochs of 60,000 images, paired
        s3_ratio, s3_label = goal["whole_ratio"], s3_goal_label(goal)
        s3_spread = "{:.2f}-{:.2f} (pairs)".format(*goal["whole_ratio_min_max"])
    else:  # an older run: the smallest of the data section's ratios
        s3 = [
            d["ratios"].get(f"s3_vs_local_w{GOAL_WORKERS}") for d in r.get("data_path", {}).values()
        ]
        s3 = [x for x in s3 if x is not None]
        s3_ratio, s3_label = (min(s3) if s3 else None), "(make bench's datasets)"
        s3_spread = "-"
    out = [
        "### 1b. Beside LitData and MosaicML Streaming",
        "",
        f"From `make bench-peers` ({p.get('date', 'date not recorded')}, {p['repeats']} "
        f"interleaved repetitions, whole epochs with worker start-up, shuffle on; full tables "
        f"in [peers.md](peers.md)). Images/s at {GOAL_WORKERS} loader workers, median "
        "(min-max).",
        "",
    ]
    if loaded(p):
        out[-2] += (
            f" **The 1-min load reached {p['load_1min_during']['max']:.1f} during that run, "
            "above the bench's own: these ratios establish nothing.**"
        )
    w, rows = GOAL_WORKERS, []
    for name, d in p["datasets"].items():
        runs = d["all_repeats"]
        cells = []
        for system in ("memory", "project", "litdata", "mds"):
            k = f"{system}_w{w}"
            cells.append(
                f"{d['images_per_second'][k]:,.0f} ({min(runs[k]):,.0f}-{max(runs[k]):,.0f})"
            )
        rows.append([f"{name} (N={d['config']['images']:,})", *cells])
    out += _table(["dataset", "in-memory limit", "this project", "LitData", "MDS"], rows)
    out += [
        "Issue 16's goals, each a ratio of medians of one run (S3 / local: section 1c, from "
        "this run):",
        "",
        *goals(p, s3_ratio, s3_label, s3_spread),
        "",
    ]
    return out


def s3_goal_label(goal: dict) -> str:
    c = goal["config"]
    return f"Fashion-MNIST (N={c['images']:,}, whole epochs, {c['pairs']} pairs)"


def s3_goal_section(goal: dict) -> list[str]:
    """1c: S3 / local shards on whole Fashion-MNIST epochs, pair by pair."""
    c = goal["config"]
    rows = [
        [
            str(i + 1),
            *(f"{p[w]['whole']:,.0f}" for w in ("local", "s3")),
            f"{p['s3']['whole'] / p['local']['whole']:.3f}",
            *(f"{p[w]['first']:.3f}" for w in ("local", "s3")),
        ]
        for i, p in enumerate(goal["pairs"])
    ]
    lo, hi = goal["whole_ratio_min_max"]
    slo, shi = goal["steady_ratio_min_max"]
    cpu = goal.get("server_cpu_seconds_per_epoch")
    return [
        f"### 1c. S3 / local shards, Fashion-MNIST (N={c['images']:,}, batch "
        f"{c['batch_size']}, {c['workers']} loader workers, whole epochs with start-up)",
        "",
        f"Ingested with the defaults to local and S3 shards; after a warm-up pair, {c['pairs']} "
        "pairs of adjacent epochs, local and S3 in alternating order (a slow moment of the "
        "machine hits both of a pair).",
        "",
        *_table(
            [
                "pair",
                "local img/s",
                "S3 img/s",
                "S3 / local",
                "local first batch s",
                "S3 first batch s",
            ],
            rows,
        ),
        f"S3 / local: median **{goal['whole_ratio']:.3f}** (min-max {lo:.3f}-{hi:.3f}) on "
        f"whole epochs; {goal['steady_ratio']:.3f} ({slo:.3f}-{shi:.3f}) on the steady rate "
        "after each epoch's first batch."
        + (
            f" SeaweedFS used {cpu:.2f} CPU-s per S3 epoch on the same 2 cores (median)."
            if cpu is not None
            else ""
        )
        + (
            f" One S3 epoch's GETs (both workers) asked for {got['fetched'] / 1e6:.1f} MB;"
            f" the shards hold {got['shards'] / 1e6:.1f} MB."
            if (got := goal.get("s3_bytes_per_epoch"))
            else ""
        )
        + " The data section's S3 rows (4,096 images) fetch their one or two shards before "
        "the first batch, so their steady rate leaves most of the S3 cost out.",
        "",
    ]


def markdown(r: dict) -> str:
    out = ["# Benchmark results", "", *summary_section(r), *machine_section(r)]
    if "data_path" in r:
        out += data_section(r["data_path"]) + peers_section(r)
    if "s3_goal" in r:
        out += s3_goal_section(r["s3_goal"])
    for key, fn in (
        ("train", train_section),
        ("overhead", overhead_section),
        ("sampling", sampling_section),
        ("quality", quality_section),
        ("fixes", fixes_section),
        ("sweep", sweep_section),
        ("gpu", gpu_section),
    ):
        if key in r:
            out += fn(r[key])
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- curve PNG


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    import math

    span = (hi - lo) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: list[tuple[str, list[tuple[float, float]], tuple]],
    xlabel: str,
) -> None:
    x0, y0, x1, y1 = box
    font, small = _font(15), _font(12)
    draw.text((x0 + 60, y0 + 4), title, fill="black", font=font)
    left, top, right, bottom = x0 + 60, y0 + 28, x1 - 12, y1 - 40
    pts = [p for _, s, _ in series for p in s]
    if not pts:
        return
    xs, ys = [p[0] for p in pts], sorted(p[1] for p in pts)
    xmin, xmax = 0.0, max(xs) or 1.0
    later = [y for x, y in pts if x >= 0.05 * xmax] or ys
    ylo, yhi = ys[0], max(later)  # the first few steps' spike is clipped
    yhi = yhi + 0.05 * ((yhi - ylo) or 1)
    ylo = ylo - 0.05 * ((yhi - ylo) or 1)

    def px(x: float, y: float) -> tuple[float, float]:
        y = min(max(y, ylo), yhi)
        return (
            left + (x - xmin) / (xmax - xmin) * (right - left),
            bottom - (y - ylo) / (yhi - ylo) * (bottom - top),
        )

    draw.rectangle((left, top, right, bottom), outline="black")
    for t in _ticks(ylo, yhi):
        _, y = px(xmin, t)
        draw.line((left - 4, y, left, y), fill="black")
        draw.line((left + 1, y, right - 1, y), fill=(230, 230, 230))
        draw.text((x0 + 2, y - 7), f"{t:g}", fill="black", font=small)
    for t in _ticks(xmin, xmax):
        x, _ = px(t, ylo)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 10, bottom + 6), f"{t:g}", fill="black", font=small)
    draw.text(((left + right) / 2 - 40, bottom + 22), xlabel, fill="black", font=small)
    for i, (label, s, color) in enumerate(series):
        if len(s) > 1:
            draw.line([px(x, y) for x, y in s], fill=color, width=2)
        draw.text((right - 150, top + 6 + 16 * i), label, fill=color, font=small)


def training_curve(quality: dict, path: Path) -> None:
    """A 2-column grid: per variant, training -ELBO (bits/dim, smoothed) against CPU seconds."""
    variants = quality["variants"]
    n_rows = (len(variants) + 1) // 2
    w, h = 1100, 40 + 360 * n_rows
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text(
        (20, 8),
        f"Fashion-MNIST, -ELBO (bits/dim) vs CPU seconds, "
        f"{quality['config']['cpu_seconds_per_variant']:.0f} CPU-s per variant (selection incl.)",
        fill="black",
        font=_font(17),
    )
    for i, (name, r) in enumerate(variants.items()):
        col, row = i % 2, i // 2
        box = (
            col * w // 2 + 10,
            40 + row * (h - 40) // n_rows,
            (col + 1) * w // 2 - 10,
            40 + (row + 1) * (h - 40) // n_rows,
        )
        pts = [(c["cpu_seconds"], c["bits_per_dim"]) for c in r["train"]["curve"]]
        smooth = [
            (x, sum(p[1] for p in pts[max(0, j - 4) : j + 1]) / len(pts[max(0, j - 4) : j + 1]))
            for j, (x, _) in enumerate(pts)
        ]
        dims_ln2 = 784 * LN2
        val = [
            (c["cpu_seconds"], c.get("elbo_bits_per_dim", c["neg_elbo"] / dims_ln2))
            for c in r["train"].get("validation_curve", [])
        ]
        _panel(
            draw,
            box,
            f"{name} ({r['chosen']['name']}): {r['train']['steps']} steps",
            [
                ("train -ELBO (smoothed)", smooth, COLORS[i % len(COLORS)]),
                ("validation -ELBO", val, "black"),
            ],
            "CPU seconds of the final run",
        )
    img.save(path)
