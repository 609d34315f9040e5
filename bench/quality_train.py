"""Model selection and training for ``make bench-quality`` (issue 17's protocol), one variant
per process. Everything here sees the Fashion-MNIST *training* split only: a seeded validation
split is cut from it, every choice (candidate configuration, checkpoint) is made on validation
numbers, and the test split is read later, once per reported number, by ``bench.quality``.

A variant is a family (preset + likelihood) with candidate configurations. Within the variant's
CPU budget, ``select_fraction`` of it is shared out in equal short trials of every candidate;
the candidate with the best validation score is then trained from scratch on the rest of the
budget, scored on validation ``checkpoints`` times, and its best checkpoint is kept. Only
training steps count against the budget (``time.process_time`` minus validation scoring, which
is reported separately).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

MLP_CLAMPS = {"logvar_clamp": [-6.0, 2.0], "max_logit": math.log(511)}  # the published code's
NO_CLAMPS = {"logvar_clamp": [-30.0, 20.0], "max_logit": 0.0}  # ModelConfig's defaults
RESNET2 = {"blocks_per_stage": 2, "latent_dim": 64}  # two residual blocks a stage, 64 latents
CURVE_POINTS = 200  # training-curve points of the final run: means over 1/200 of its budget
BATCH = 128
WARMUP_STEPS = 100


@dataclass(frozen=True)
class Candidate:
    """One configuration tried on validation.

    Attributes:
        name: label in results.json.
        model: ``ModelConfig`` overrides on the variant's preset.
        lr: AdamW peak learning rate (100 warm-up steps, cosine over the budget).
        objective: ``elbo`` or ``iwae`` (``optim.objective``), with ``iwae_train_k`` draws.
        kl_warmup: fraction of the budget over which the KL weight ramps 0 -> 1 (0: none).
        free_bits: nats per latent group (``optim.free_bits``; ELBO only).
    """

    name: str
    model: dict = field(default_factory=dict)
    lr: float = 2e-3
    objective: str = "elbo"
    iwae_train_k: int = 1
    kl_warmup: float = 0.0
    free_bits: float = 0.0


@dataclass(frozen=True)
class Variant:
    """A model family run as one process: preset, likelihood, how validation scores it
    (``nll``: IWAE-k NLL of the fixed-binarized validation images; ``elbo``: -ELBO of the
    8-bit validation images), and its candidates (the first is the baseline)."""

    preset: str
    likelihood: str
    score: str
    candidates: tuple[Candidate, ...]


VARIANTS: dict[str, Variant] = {
    "bernoulli_mlp": Variant(
        "mnist28_mlp",
        "bernoulli",
        "nll",
        (
            Candidate("published_clamps"),  # the preset: MLP_CLAMPS
            Candidate("no_clamps", model=NO_CLAMPS),
            Candidate("lr_1e-3", lr=1e-3),
            Candidate("iwae_k5", objective="iwae", iwae_train_k=5),
            Candidate("kl_warmup_10pct", kl_warmup=0.1),
        ),
    ),
    "bernoulli": Variant(
        "mnist28",
        "bernoulli",
        "nll",
        (
            Candidate("base"),  # [32, 64] channels, 1 residual block a stage, 32 latents
            Candidate("resnet2_latent64", model=RESNET2),
            Candidate("clamps", model=MLP_CLAMPS),
            Candidate("iwae_k5", objective="iwae", iwae_train_k=5),
            Candidate("free_bits_warmup", free_bits=0.1, kl_warmup=0.1),
        ),
    ),
    "discretized_logistic": Variant(
        "mnist28",
        "discretized_logistic",
        "elbo",
        (
            Candidate("base"),
            Candidate("resnet2_latent64", model=RESNET2),
            Candidate("batchnorm_relu", model={"norm": "batch", "activation": "relu"}),
            Candidate("free_bits_warmup", free_bits=0.1, kl_warmup=0.1),
        ),
    ),
    "laplace": Variant("mnist28", "laplace", "elbo", (Candidate("base"),)),
    "gaussian": Variant("mnist28", "gaussian", "elbo", (Candidate("base"),)),
}


class CountingSource:
    """Fashion-MNIST images as float (N, 1, 28, 28) in [0, 1], counting reads per split: the
    audit trail that selection and training never read the test split."""

    def __init__(self) -> None:
        from pipeline.data.sources import FashionMNIST

        self.reads: Counter = Counter()
        self._source = FashionMNIST()

    def images(self, split: str) -> torch.Tensor:
        self.reads[split] += 1
        images, _ = self._source.arrays(split)
        return torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255)


def training_splits(source: CountingSource, size: int, seed: int) -> tuple[dict, dict]:
    """({"train": (N - size) images, "val": size images}, split metadata) of the training set."""
    from pipeline.model.quality import indices_sha256, validation_split

    images = source.images("train")
    train_idx, val_idx = validation_split(len(images), size, seed)
    val = images[val_idx]
    meta = {
        "source": "Fashion-MNIST train (60,000)",
        "size": len(val_idx),
        "train_size": len(train_idx),
        "seed": seed,
        "indices_sha256": indices_sha256(val_idx),
        "images_sha256": _uint8_sha256(val),
    }
    return {"train": images[train_idx], "val": val}, meta


def _uint8_sha256(x: torch.Tensor) -> str:
    import hashlib

    data = torch.round(x * 255).to(torch.uint8).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


class CpuClock:
    """This process's CPU seconds since creation, minus the spans run ``excluding()``."""

    def __init__(self) -> None:
        self.start, self.excluded = time.process_time(), 0.0

    def seconds(self) -> float:
        return time.process_time() - self.start - self.excluded

    @contextmanager
    def excluding(self) -> Iterator[None]:
        t = time.process_time()
        try:
            yield
        finally:
            self.excluded += time.process_time() - t


def validation_set(variant: Variant, val: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` validation images as they are scored: one fixed binarization (its own
    seed) for Bernoulli decoders, the 8-bit grid otherwise."""
    from pipeline.model.quality import VALIDATION_BINARIZATION_SEED, binarize_fixed, quantize_8bit

    x = val[:n] if n else val
    if variant.likelihood == "bernoulli":
        return binarize_fixed(x, VALIDATION_BINARIZATION_SEED)
    return quantize_8bit(x)


@torch.no_grad()
def validate(vae, variant: Variant, val_set: torch.Tensor, k: int) -> dict:
    """Validation numbers of ``vae``; ``score`` (lower is better) is what selection reads."""
    from pipeline.model import evaluate
    from pipeline.model.quality import binary_nll

    batches = list(val_set.split(50))
    if variant.score == "nll":
        r = binary_nll(vae, batches, k, chunk=max(1, 2048 // 50), seed=0)
        out = {"nll_iwae": r["nll_iwae"], "neg_elbo": r["neg_elbo"], "k": k}
        out["score"] = out["nll_iwae"]
    else:
        r = evaluate(vae, batches, 1, generator=torch.Generator().manual_seed(0))
        out = {"neg_elbo": r["neg_elbo"], "elbo_bits_per_dim": r["elbo_bits_per_dim"], "k": 1}
        out["score"] = out["neg_elbo"]
    out["images"] = len(val_set)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def fit(
    variant: Variant,
    cand: Candidate,
    train: torch.Tensor,
    budget_s: float,
    *,
    seed: int = 0,
    val_set: torch.Tensor | None = None,
    val_k: int = 1,
    checkpoints: int = 0,
) -> tuple[torch.nn.Module, dict]:
    """Train ``cand`` from scratch for ``budget_s`` training CPU seconds of this process.

    With ``checkpoints`` > 0 the model is scored on ``val_set`` that many times (evenly over
    the budget, the last at the end) and the best-scoring weights are returned.
    """
    from pipeline.model import VAE, kl_warmup, preset, training_terms
    from pipeline.model.quality import binarize, quantize_8bit

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = VAE.from_config(preset(variant.preset, likelihood=variant.likelihood, **cand.model))
    opt = torch.optim.AdamW(vae.parameters(), lr=cand.lr, weight_decay=1e-4)
    clock, wall0 = CpuClock(), time.perf_counter()
    curve, val_curve, acc, acc_steps = [], [], Counter(), 0
    next_point, next_check = budget_s / CURVE_POINTS, budget_s / max(checkpoints, 1)
    best: tuple[float, dict, int] | None = None
    step = epoch = 0

    def check(used: float) -> None:
        nonlocal best
        with clock.excluding():
            v = validate(vae, variant, val_set, val_k)
            val_curve.append({"step": step, "cpu_seconds": round(used, 1), **v})
            if best is None or v["score"] < best[0]:
                best = (v["score"], {k: t.clone() for k, t in vae.state_dict().items()}, step)

    done = False
    while not done:
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(train) - BATCH + 1, BATCH):
            x = train[order[i : i + BATCH]]
            x = binarize(x, g) if variant.likelihood == "bernoulli" else quantize_8bit(x)
            used = clock.seconds()
            scale = (
                min(1.0, (step + 1) / WARMUP_STEPS)
                * 0.5
                * (1 + math.cos(math.pi * used / budget_s))
            )
            for group in opt.param_groups:
                group["lr"] = cand.lr * max(scale, 0.01)
            out = training_terms(
                vae,
                x,
                objective=cand.objective,
                iwae_k=cand.iwae_train_k,
                kl_weight=kl_warmup(used, cand.kl_warmup * budget_s),  # CPU seconds as the clock
                free_bits=cand.free_bits,
                generator=g,
            )
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            acc.update({k: float(out[k]) for k in ("bits_per_dim", "rate_bits", "distortion_bits")})
            acc_steps += 1
            used = clock.seconds()
            if used >= next_point and acc_steps >= 5:
                curve.append(
                    {
                        "step": step,
                        "cpu_seconds": round(used, 2),
                        **{k: round(v / acc_steps, 4) for k, v in acc.items()},
                    }
                )
                acc, acc_steps, next_point = Counter(), 0, used + budget_s / CURVE_POINTS
            if used >= budget_s:
                done = True
                break
            if checkpoints and used >= next_check:
                check(used)
                next_check += budget_s / checkpoints
        epoch += 1
    info = {
        "steps": step,
        "epochs": round(step * BATCH / len(train), 2),
        "images": step * BATCH,
        "cpu_seconds": round(clock.seconds(), 1),
        "validation_cpu_seconds": round(clock.excluded, 1),
        "wall_seconds": round(time.perf_counter() - wall0, 1),
        "curve": curve,
    }
    if checkpoints:
        check(clock.seconds())
        score, state, best_step = best
        vae.load_state_dict(state)
        info |= {"validation_curve": val_curve, "chosen_checkpoint_step": best_step}
    return vae.eval(), info


def select_and_train(
    name: str, train: torch.Tensor, val: torch.Tensor, budget_s: float, opts: dict
) -> tuple[torch.nn.Module, dict]:
    """Pick ``name``'s candidate on validation and train it; sees training data only.

    Returns the chosen, trained model (its best validation checkpoint) and the record:
    every candidate's trial and validation score, the choice, the final run's steps and CPU.
    """
    variant = VARIANTS[name]
    val_set = validation_set(variant, val, opts["select_images"])
    k = opts["select_k"]
    trials, spent = [], 0.0
    chosen = variant.candidates[0]
    if len(variant.candidates) > 1:
        per = opts["select_fraction"] * budget_s / len(variant.candidates)
        for cand in variant.candidates:
            vae, info = fit(variant, cand, train, per, seed=opts["seed"])
            score = validate(vae, variant, val_set, k)
            spent += info["cpu_seconds"]
            info.pop("curve")
            trials.append({"candidate": asdict(cand), "train": info, "validation": score})
        chosen_trial = min(trials, key=lambda t: t["validation"]["score"])
        chosen = next(c for c in variant.candidates if c.name == chosen_trial["candidate"]["name"])
    vae, info = fit(
        variant,
        chosen,
        train,
        budget_s - spent,
        seed=opts["seed"],
        val_set=val_set,
        val_k=k,
        checkpoints=max(1, opts["checkpoints"]),
    )
    record = {
        "preset": variant.preset,
        "likelihood": variant.likelihood,
        "selection_score": (
            f"validation IWAE-{k} NLL (nats), {len(val_set)} images, fixed binarization"
            if variant.score == "nll"
            else f"validation -ELBO (nats), {len(val_set)} 8-bit images"
        ),
        "selection": trials,
        "chosen": asdict(chosen),
        "model_config": asdict(vae.config),
        "train": info,
        "cpu_seconds": {
            "budget": round(budget_s, 1),
            "selection_trials": round(spent, 1),
            "final_run": info["cpu_seconds"],
            "training_total": round(spent + info["cpu_seconds"], 1),
        },
    }
    return vae, record
