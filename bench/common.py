"""Run settings (quick / full), the machine description and small statistics helpers."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Settings:
    """Sizes and repetitions of one benchmark run; ``full()`` and ``quick()`` are the two modes.

    Every count is stated in the output next to the number it produced.
    """

    mode: str
    repeats: int  # interleaved repetitions of each measurement (medians are reported)
    # 1. data path
    data_count_28: int  # synthetic 28x28 PNG and the Fashion-MNIST subset
    data_count_256: int  # synthetic 256x256 JPEG
    data_batch: int = 64
    data_batch_256: int = 32  # 256x256: fewer images, smaller batches, still >= 8 batches
    data_workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    s3_goal_count: int = 0  # Fashion-MNIST training images of the S3 goal (0: all 60,000)
    s3_goal_pairs: int = 12  # its pairs of adjacent local / S3 epochs (6 left a wide spread)
    # 2./3. training
    batch: int = 128  # global batch
    threads: int = 1  # torch threads per training process
    loader_workers: int = 1  # DataLoader workers per Ray Train worker
    train_steps: int = 200  # steps of each Ray Train run
    log_every: int = 10
    plain_steps: int = 100  # steps of each plain-loop repetition (after warm-up)
    overhead_steps: int = 120  # steps of the minimal DDP loop (TorchTrainer / torchrun)
    overhead_repeats: int = 3
    # 4. sampling
    sample_count: int = 8192
    sample_batch: int = 512
    sample_repeats: int = 3
    # 5. quality (issue 17's protocol; bench.quality)
    quality_cpu_seconds: float = 60.0  # training CPU budget per variant (1 thread), selection incl.
    quality_test_images: int = 0  # 0: the whole 10k test split
    iwae_k: int = 5000
    iwae_images: int = 2000  # conv IWAE-k images (first N of the test split; the MLP: all)
    bpd_iwae_k: int = 100
    bpd_iwae_images: int = 2000
    val_size: int = 5000  # validation split cut from the 60k training images
    val_seed: int = 17
    select_k: int = 32  # IWAE-k on validation, the binarized variants' selection score
    select_images: int = 1000  # validation images scored per candidate / checkpoint
    select_fraction: float = 0.25  # of the CPU budget spent on candidate trials
    checkpoints: int = 8  # validation checks of the final run; the best one is kept
    eval_workers: int = 0  # test-evaluation processes after training (0: one per core)
    iwae_shard: int = 250  # test images per evaluation job

    @classmethod
    def full(cls) -> Settings:
        return cls(mode="full", repeats=3, data_count_28=4096, data_count_256=512)

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            mode="quick",
            repeats=3,
            data_count_28=1024,
            data_count_256=256,
            s3_goal_count=8192,
            s3_goal_pairs=2,
            train_steps=40,
            log_every=5,
            plain_steps=30,
            overhead_steps=30,
            overhead_repeats=1,
            sample_count=2048,
            sample_repeats=1,
            quality_cpu_seconds=10.0,
            quality_test_images=1000,
            iwae_k=100,
            iwae_images=8,
            bpd_iwae_k=20,
            bpd_iwae_images=50,
            select_k=4,
            select_images=64,
            checkpoints=2,
            iwae_shard=8,
        )

    @classmethod
    def quality_smoke(cls) -> Settings:
        """``bench.run --quality-smoke``: the whole bench-quality path in a couple of minutes
        (8 CPU-s a variant; every protocol field written; the numbers mean nothing)."""
        return cls(
            mode="quality-smoke",
            repeats=1,
            data_count_28=0,
            data_count_256=0,
            quality_cpu_seconds=8.0,
            quality_test_images=500,
            iwae_k=20,
            iwae_images=16,
            bpd_iwae_k=5,
            bpd_iwae_images=16,
            select_k=4,
            select_images=64,
            checkpoints=2,
            iwae_shard=8,
        )


def median(values) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def later_half(values: list) -> list:
    """The second half of a series (steady state: start-up excluded)."""
    return values[len(values) // 2 :]


def rnd(x: float, digits: int = 1) -> float:
    return round(float(x), digits)


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """CPU model, cores, memory, load, library versions: the context every number needs."""
    from importlib.metadata import version

    import torch

    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "gpu": "none" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": version("ray"),
        "pillow": version("pillow"),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


class Stopwatch:
    """``with Stopwatch() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block_pattern(name: str) -> re.Pattern:
    """README.md's generated block ``<!-- NAME -->`` ... ``<!-- /NAME -->``."""
    return re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)


def write_readme_block(name: str, lines: list[str], readme: Path = README) -> None:
    """Replace the body of README's ``name`` block with ``lines``; an error if it is missing."""
    pattern = readme_block_pattern(name)
    text = readme.read_text()
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no <!-- {name} --> block")
    body = "\n".join(lines).rstrip("\n") + "\n"
    readme.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(2), text))
