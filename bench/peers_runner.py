"""One side of ``make bench-peers`` (:mod:`bench.peers`): times whole loader epochs on request.

Two copies run as subprocesses, one per venv, so the peers never share an interpreter (or a
torch) with the project:

* ``.venv`` (the project's): ``memory`` (the in-memory decode limit) and ``project``
  (:class:`pipeline.data.stream.ShardStream` through :func:`~pipeline.data.stream.make_loader`).
* ``.venv-peers``: ``litdata`` (``litdata.StreamingDataset`` + ``StreamingDataLoader``) and
  ``mds`` (MosaicML Streaming's ``StreamingDataset`` + a torch ``DataLoader``), and the
  conversion of the same encoded images into their formats.

Protocol: one JSON request per line on stdin, one JSON answer per line on stdout (anything the
libraries print goes to stderr). ``python -m bench.peers_runner --check torch==X`` instead
verifies the peers' venv: torch is exactly ``X`` and both peers import; it exits 1 otherwise.

torchvision: PyPI's wheel is a CUDA build that cannot load beside the CPU torch (``operator
torchvision::nms does not exist``) and no CPU build is on PyPI, so ``.venv-peers`` has none.
``mosaicml-streaming`` imports two names from it at package import (``streaming.vision``, which
this bench never uses); :func:`stub_torchvision` provides exactly those two, raising if called.
LitData imports torchvision only when it is installed, for serializers this bench does not use
(images are stored as ``bytes``).
"""

from __future__ import annotations

import gc
import importlib.machinery
import io
import json
import multiprocessing
import pickle
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

FORMATS = {b"\x89P": ("PNG",), b"\xff\xd8": ("JPEG",)}  # by the first two bytes
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def decode_uint8(data: bytes, mode: str) -> torch.Tensor:
    """Encoded PNG/JPEG bytes -> uint8 ``(C, H, W)``; the decode of every row but the
    project's, which runs its own ``decode_image``: the same decoders plus its checks.

    A JPEG goes through simplejpeg, as the project's default ``data.jpeg_decoder`` does
    (the header read first, a CMYK JPEG or a color one to grayscale left to Pillow, as
    there); anything else through Pillow with the same fast calls as the project's (the
    format named, not probed for; the pixels by ``tobytes()``). So every row decodes at the
    same cost and the ratios compare loaders, not decoders: ``np.array(Image.open(...))``
    would be 2-4 us a sample slower, Pillow for a 64x64 JPEG ~80 us slower than simplejpeg.
    """
    if data[:3] == b"\xff\xd8\xff":
        _, _, space, _ = simplejpeg.decode_jpeg_header(data)
        if space == "Gray" or (space == "YCbCr" and mode == "RGB"):
            pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB")
            return torch.from_numpy(pixels).permute(2, 0, 1)
    image = Image.open(io.BytesIO(data), formats=FORMATS.get(data[:2]))
    if image.mode != mode:
        image = image.convert(mode)
    width, height = image.size
    # read-only, as the project's: the batch's stack copies it (torch warns once otherwise)
    pixels = torch.from_numpy(np.frombuffer(image.tobytes(), np.uint8))
    if mode == "L":
        return pixels.view(1, height, width)
    return pixels.view(height, width, 3).permute(2, 0, 1)


def decode_item(item: dict, mode: str) -> tuple[torch.Tensor, int]:
    """A peer's stored record ``{"image": bytes, "label": int}`` -> ``(uint8 image, label)``."""
    return decode_uint8(item["image"], mode), int(item["label"])


def consume(images: torch.Tensor) -> int:
    """The consumer's step, the same for every row: uint8 -> float32 in [0, 1] in the main
    process (what ``make_loader`` does to the project's batches itself)."""
    assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
    return len(images.float().div_(255))


# ---------------------------------------------------------------------------- conversion


def load_samples(path: str) -> dict:
    """The samples file :mod:`bench.peers` writes: ``images`` (encoded bytes), ``labels``,
    ``mode`` ("L"/"RGB")."""
    with open(path, "rb") as f:
        return pickle.load(f)


def litdata_record(sample: tuple[bytes, int]) -> dict:
    return {"image": sample[0], "label": sample[1]}


def convert_litdata(samples: dict, out: str, per_chunk: int) -> None:
    import litdata

    # optimize() sets the global start method to spawn; the epochs timed later in this
    # process must get the default (fork), as a training script that never converts does
    method = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(
            fn=litdata_record,
            inputs=list(zip(samples["images"], samples["labels"])),
            output_dir=out,
            chunk_size=per_chunk,
            num_workers=1,
            mode="overwrite",
            verbose=False,
        )
    finally:
        multiprocessing.set_start_method(method, force=True)


def convert_mds(samples: dict, out: str, per_chunk: int) -> None:
    stub_torchvision()
    from streaming import MDSWriter

    images = samples["images"]
    # MDS cuts shards by bytes only: the mean record size times the samples per shard
    size_limit = per_chunk * (sum(map(len, images)) // len(images) + 32)
    with MDSWriter(out=out, columns={"image": "bytes", "label": "int"}, size_limit=size_limit) as w:
        for image, label in zip(images, samples["labels"]):
            w.write({"image": image, "label": int(label)})


# ---------------------------------------------------------------------------- epochs


class MemoryDataset(Dataset):
    """The in-memory limit: the same encoded bytes from a Python list."""

    def __init__(self, images: list[bytes], mode: str):
        self.images, self.mode = images, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_uint8(self.images[i], self.mode)


def memory_batches(data: dict, batch: int, workers: int):
    samples = _samples(data["samples"])
    dataset = MemoryDataset(samples["images"], samples["mode"])
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers
    )
    return (consume(images) for images in loader)


def project_batches(data: dict, batch: int, workers: int):
    from pipeline.data.config import StreamConfig
    from pipeline.data.stream import ShardStream, make_loader

    # the defaults a user gets: shuffle on, shuffle_buffer 1000, normalize "unit"
    config = StreamConfig(train_url=data["project"])
    stream = ShardStream(config, rank=0, world_size=1, batch_size=batch, num_workers=workers)
    return (len(b["image"]) for b in make_loader(stream))


def litdata_batches(data: dict, batch: int, workers: int):
    import litdata

    mode = _samples(data["samples"])["mode"]
    dataset = litdata.StreamingDataset(
        data["litdata"], shuffle=True, transform=partial(decode_item, mode=mode)
    )
    loader = litdata.StreamingDataLoader(dataset, batch_size=batch, num_workers=workers)
    return (consume(images) for images, _ in loader)


def mds_batches(data: dict, batch: int, workers: int):
    stub_torchvision()
    import streaming
    from streaming.base.util import clean_stale_shared_memory

    mode = _samples(data["samples"])["mode"]
    clean_stale_shared_memory()  # the previous epoch's dataset registered the same folder

    class Decoded(streaming.StreamingDataset):
        def __getitem__(self, index: int):
            return decode_item(super().__getitem__(index), mode)

    dataset = Decoded(local=data["mds"], shuffle=True, batch_size=batch)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True)
    return (consume(images) for images, _ in loader)


SYSTEMS = {
    "memory": memory_batches,
    "project": project_batches,
    "litdata": litdata_batches,
    "mds": mds_batches,
}


def timed_epoch(system: str, data: dict, batch: int, workers: int) -> dict:
    """One whole epoch from constructing the dataset to the last batch (worker start-up in)."""
    t0 = time.perf_counter()
    images, first = 0, 0.0
    for n in SYSTEMS[system](data, batch, workers):
        images += n
        if not first:
            first = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    gc.collect()  # the loader and its dataset go now, not during the next epoch
    return {"images": images, "seconds": seconds, "first_batch_seconds": first}


_cache: dict[str, dict] = {}


def _samples(path: str) -> dict:
    if path not in _cache:
        _cache.clear()
        _cache[path] = load_samples(path)
    return _cache[path]


# ---------------------------------------------------------------------------- torchvision


def stub_torchvision() -> None:
    """Stand in for torchvision where it is absent (see the module docstring): exactly the
    two names ``streaming.vision.base`` imports at package import, neither usable."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401  (a real, loadable one wins)

        return
    except ImportError:
        pass

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is a stub in .venv-peers (bench/peers_runner.py)")

    root = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    datasets.VisionDataset = type("VisionDataset", (), {"__init__": unavailable})
    functional.to_tensor = unavailable
    root.datasets, root.transforms, transforms.functional = datasets, transforms, functional
    for module in (root, datasets, transforms, functional):
        # a spec without a distribution: transformers (imported by streaming) then reports
        # torchvision unavailable instead of failing on find_spec
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        sys.modules[module.__name__] = module


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("litdata", "mosaicml-streaming", "numpy", "pillow", "simplejpeg", "torchvision"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["torchvision"] = out["torchvision"] or "absent (stubbed for streaming's import)"
    return out


def check(requirement: str) -> int:
    """``torch==X``: exit 1 unless torch is exactly X and both peers import."""
    want = requirement.split("==", 1)[1]
    if torch.__version__ != want:
        print(
            f"FAIL: torch {torch.__version__} in {sys.prefix}, expected {want}: the peers' "
            "install replaced it; rebuild with `rm -rf .venv-peers && make bench-peers-venv`",
            file=sys.stderr,
        )
        return 1
    stub_torchvision()
    import litdata  # noqa: F401
    import streaming  # noqa: F401

    print(f"ok: {json.dumps(versions())}")
    return 0


def serve() -> int:
    # The consumer only casts batches, as a GPU training loop's host thread does. With torch's
    # default intra-op pool every cast wakes a second thread that then spins, and on 2 cores
    # that spinning took ~2 of every 3 CPU-seconds of an epoch from the loader workers, for
    # every row alike (28x28: the in-memory limit ran at 22k img/s with the pool, 43k without).
    torch.set_num_threads(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # the libraries' prints must not break the protocol
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "versions":
            answer = versions()
        elif op == "convert":
            samples = load_samples(request["samples"])
            Path(request["out"]).parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            {"litdata": convert_litdata, "mds": convert_mds}[request["system"]](
                samples, request["out"], request["per_chunk"]
            )
            answer = {"seconds": time.perf_counter() - t0}
        elif op == "epoch":
            answer = timed_epoch(
                request["system"], request["data"], request["batch"], request["workers"]
            )
        else:
            raise ValueError(f"unknown op {op!r}")
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        raise SystemExit(check(sys.argv[2]))
    raise SystemExit(serve())
