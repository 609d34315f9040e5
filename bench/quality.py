"""5. Quality after a fixed CPU budget: five variants trained on Fashion-MNIST for the same
CPU seconds each (one torch thread, one process per variant, run side by side), then
evaluated on the test split.

* ``bernoulli_mlp``: the published baseline's architecture (784-300-300-40 MLP, preset
  ``mnist28_mlp``), dynamically binarized training; test NLL in nats by IWAE-k on the whole
  stochastically binarized test split (``pipeline.model.quality``): the number to hold against
  the literature's 228.7 nats.
* ``bernoulli``: the pipeline's conv VAE (preset ``mnist28``), same data; IWAE-k on a stated
  subset (a conv decoder pass costs ~50x an MLP's here), the MLP is scored on the same subset.
* ``discretized_logistic``: 8-bit bits/dim (ELBO on the whole test split; IWAE-k on a subset).
* ``laplace`` (L1) and ``gaussian`` (L2), fixed sigma: rate and distortion on the test split.

The learning rate warms up for 100 steps, then follows a cosine over the CPU budget.

Only training counts against the budget (``time.process_time`` of the variant's process);
evaluation is extra and timed separately.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from bench.common import Settings, rnd

VARIANTS = {  # name -> (model preset, likelihood)
    "bernoulli_mlp": ("mnist28_mlp", "bernoulli"),
    "bernoulli": ("mnist28", "bernoulli"),
    "discretized_logistic": ("mnist28", "discretized_logistic"),
    "laplace": ("mnist28", "laplace"),
    "gaussian": ("mnist28", "gaussian"),
}
LN2 = 0.6931471805599453
LR = 2e-3
CURVE_POINTS = 400  # points of the training curve: means over 1/400 of the CPU budget


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def train_variant(name: str, cpu_seconds: float, batch: int, eval_options: dict) -> dict:
    """Train one variant for ``cpu_seconds`` of this process's CPU time, then evaluate it."""
    from bench.loops import fmnist_images
    from pipeline.model import VAE, elbo_terms, evaluate, preset
    from pipeline.model.quality import (
        binarize,
        bits_per_dim_8bit,
        fashion_mnist_nll,
        quantize_8bit,
    )

    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train = fmnist_images(0, "train")
    test = fmnist_images(eval_options["test_images"], "test")
    model, likelihood = VARIANTS[name]
    vae = VAE.from_config(preset(model, likelihood=likelihood))
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=1e-4)
    curve, step, epoch = [], 0, 0
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def set_lr() -> None:  # warm-up, then a cosine over the CPU budget
        used = min(1.0, (time.process_time() - cpu0) / cpu_seconds)
        scale = min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * used))
        for group in opt.param_groups:
            group["lr"] = LR * max(scale, 0.01)

    acc: dict[str, float] = {}
    acc_steps, next_point = 0, cpu_seconds / CURVE_POINTS
    done = False
    while not done:
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(train) - batch + 1, batch):
            x = train[order[i : i + batch]]
            x = binarize(x, g) if likelihood == "bernoulli" else quantize_8bit(x)
            out = elbo_terms(vae, x)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            set_lr()
            opt.step()
            step += 1
            for k in ("bits_per_dim", "rate_bits", "distortion_bits"):
                acc[k] = acc.get(k, 0.0) + float(out[k])
            acc_steps += 1
            used = time.process_time() - cpu0
            if used >= next_point and acc_steps >= 5:
                curve.append(
                    {
                        "step": step,
                        "cpu_seconds": round(used, 2),
                        "wall_seconds": round(time.perf_counter() - wall0, 2),
                        **{k: round(v / acc_steps, 4) for k, v in acc.items()},
                    }
                )
                acc, acc_steps, next_point = {}, 0, used + cpu_seconds / CURVE_POINTS
            if time.process_time() - cpu0 >= cpu_seconds:
                done = True
                break
        epoch += 1
    trained = {
        "steps": step,
        "epochs_started": epoch,
        "images": step * batch,
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "wall_seconds": round(time.perf_counter() - wall0, 1),
    }
    if eval_options.get("save_dir"):  # the trained weights, to re-evaluate without retraining
        from dataclasses import asdict
        from pathlib import Path

        from pipeline.model import save_weights

        path = Path(eval_options["save_dir"], f"{name}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            save_weights(vae, metadata={"model_config": json.dumps(asdict(vae.config))})
        )
    t_eval = time.perf_counter()
    vae.eval()
    res: dict = {}
    test_batches = _batches(test, 500)
    if likelihood == "bernoulli":
        # the same seed binarizes the same test images the same way in every variant
        full = fashion_mnist_nll(vae, test_batches, k=1, seed=0)
        n, k = eval_options["iwae_images"], eval_options["iwae_k"]
        iwae = fashion_mnist_nll(vae, [test[:n]], k=k, chunk=max(1, 2048 // n), seed=0)
        res = {
            "test_neg_elbo_nats": full["neg_elbo"],
            "test_images": int(full["n_images"]),
            "iwae_nll_nats": iwae["nll_iwae"],
            "iwae_k": k,
            "iwae_images": n,
            "subset_neg_elbo_nats": iwae["neg_elbo"],
            "active_units": full["active_units"],
            "psnr_db": full["psnr"],
            "rate_bits": full["rate"] / LN2,
            "distortion_bits": full["distortion"] / LN2,
        }
        if model == "mnist28_mlp":  # cheap enough for IWAE-k on every test image
            whole = fashion_mnist_nll(vae, _batches(test, 100), k=k, chunk=100, seed=0)
            res |= {
                "full_iwae_nll_nats": whole["nll_iwae"],
                "full_iwae_images": int(whole["n_images"]),
                "full_neg_elbo_nats": whole["neg_elbo"],
                "full_gap_nats": whole["gap"],
            }
    else:
        full = (
            bits_per_dim_8bit(vae, test_batches, k=1, seed=0)
            if likelihood == "discretized_logistic"
            else evaluate(
                vae,
                [quantize_8bit(b) for b in test_batches],
                k=1,
                generator=torch.Generator().manual_seed(0),
            )
        )
        res = {
            "test_elbo_bits_per_dim": full["elbo_bits_per_dim"],
            "test_images": int(full["n_images"]),
            "rate_bits": full["rate"] / LN2,
            "distortion_bits": full["distortion"] / LN2,
            "psnr_db": full["psnr"],
            "active_units": full["active_units"],
        }
        if likelihood == "discretized_logistic":
            n, k = eval_options["bpd_iwae_images"], eval_options["bpd_iwae_k"]
            iwae = bits_per_dim_8bit(vae, [test[:n]], k=k, chunk=max(1, 2048 // n), seed=0)
            res |= {"iwae_bits_per_dim": iwae["bits_per_dim"], "iwae_k": k, "iwae_images": n}
    res = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
    return {
        "likelihood": likelihood,
        "model": model,
        "train": trained,
        "test": res,
        "curve": curve,
        "eval_wall_seconds": round(time.perf_counter() - t_eval, 1),
    }


def run(
    settings: Settings, log=print, variants: list[str] | None = None, save_dir: str = ""
) -> dict:
    """The ``variants`` (default: all) side by side, one process each (``spawn``: no inherited
    threads/state); trained weights go to ``save_dir`` if given."""
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown quality variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    options = {
        "test_images": settings.quality_test_images,
        "iwae_k": settings.iwae_k,
        "iwae_images": settings.iwae_images,
        "bpd_iwae_k": settings.bpd_iwae_k,
        "bpd_iwae_images": settings.bpd_iwae_images,
    }
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(variants), mp_context=ctx) as pool:
        futures = {
            v: pool.submit(
                train_variant,
                v,
                settings.quality_cpu_seconds,
                settings.batch,
                {**options, "save_dir": save_dir},
            )
            for v in variants
        }
        out = {v: f.result() for v, f in futures.items()}
    for r in out.values():
        r["run"] = {"started": started, "side_by_side_with": len(variants) - 1}
    for v, r in out.items():
        log(f"quality {v}: {r['train']['steps']} steps, {r['test']}")
    return {
        "config": {
            "model": "mnist28 (conv), mnist28_mlp (784-300-300-40)",
            "cpu_seconds_per_variant": settings.quality_cpu_seconds,
            "cpu_minutes_per_variant": rnd(settings.quality_cpu_seconds / 60, 2),
            "torch_threads": 1,
            "batch_size": settings.batch,
            "processes_side_by_side": len(variants),
            "optimizer": f"AdamW {LR:g}, 100 warm-up steps, cosine over the budget",
            "sigma_laplace_gaussian": 0.1,
            "data": "Fashion-MNIST 60k train / test split",
            **options,
        },
        "variants": out,
    }
