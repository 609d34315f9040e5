"""Image sources for ingest: Fashion-MNIST idx files, image folders, tar/zip archives, synthetic.

A source knows its splits and loads one sample at a time, ``load(split, i) -> (image, label)``
with ``label = -1`` when unlabelled. Sources are cheap to pickle: each ingest worker process
opens files (and caches arrays/archive handles) on first use.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.config import IngestConfig
from pipeline.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_DEBIAN_DIR = "usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ---------------------------------------------------------------------------- Fashion-MNIST


def find_fashion_mnist(path: str = "") -> Path:
    """The idx folder: ``path`` if given, else Debian's package dir or the repo's extracted copy.

    Raises:
        DataError: none of the candidates holds the idx files.
    """
    repo = Path(__file__).resolve().parents[2]
    env = os.environ.get("PIPELINE_FASHION_MNIST_DIR")  # the local stack sets it for Ray jobs
    candidates = (
        [Path(path)]
        if path
        else [
            *([Path(env)] if env else []),
            Path("/") / _DEBIAN_DIR,
            repo / ".cache/debs/fashion-mnist" / _DEBIAN_DIR,
            Path.cwd() / ".cache/debs/fashion-mnist" / _DEBIAN_DIR,
        ]
    )
    for c in candidates:
        if _idx_file(c, _FMNIST_FILES["train"][0]) is not None:
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Fashion-MNIST idx files not found (tried {tried}); install the "
        "dataset-fashion-mnist package or set source_path"
    )


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array: images (N, H, W), labels (N,)."""
    with _open_idx(Path(path)) as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):  # 0x08: unsigned byte
        raise DataError(f"{path}: not a uint8 idx file (magic {magic:#x})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_count(path: Path) -> int:
    with _open_idx(path) as f:
        return struct.unpack(">II", f.read(8))[1]


class FashionMNIST:
    """The idx files of Fashion-MNIST: 60000 train and 10000 test 28x28 grayscale images."""

    def __init__(self, path: str = ""):
        self.root = find_fashion_mnist(path)
        self.classes = FASHION_MNIST_CLASSES
        self.splits = {s: _idx_count(self._file(s, 0)) for s in _FMNIST_FILES}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _file(self, split: str, which: int) -> Path:
        path = _idx_file(self.root, _FMNIST_FILES[split][which])
        if path is None:
            raise DataError(f"{self.root}: missing {_FMNIST_FILES[split][which]}[.gz]")
        return path

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, 28, 28) uint8, labels (N,) uint8) of ``split``."""
        if split not in self._arrays:
            self._arrays[split] = (read_idx(self._file(split, 0)), read_idx(self._file(split, 1)))
        return self._arrays[split]

    def load(self, split: str, i: int) -> tuple[Image.Image, int]:
        images, labels = self.arrays(split)
        return Image.fromarray(images[i], mode="L"), int(labels[i])

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}


# ---------------------------------------------------------------------------- folders, archives


def _split_indices(n: int, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """A deterministic train/test split of ``range(n)``; each list sorted."""
    n_test = int(round(n * test_fraction))
    perm = np.random.default_rng([seed, 7]).permutation(n)
    return {"train": sorted(perm[n_test:].tolist()), "test": sorted(perm[:n_test].tolist())}


def _labels(paths: list[str]) -> tuple[list[int], list[str]]:
    """Labels from the first folder of each relative path; one shared top folder is skipped."""
    parts = [p.split("/") for p in paths]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    classes = sorted({p[0] for p in parts if len(p) > 1})
    index = {c: i for i, c in enumerate(classes)}
    return [index[p[0]] if len(p) > 1 else -1 for p in parts], classes


class EmptyFile(ValueError):
    """A zero-byte image file."""


class _Listed:
    """A source over a sorted list of image names, split by ``test_fraction``."""

    def __init__(self, names: list[str], config: IngestConfig):
        self.names = sorted(names)
        if not self.names:
            raise DataError(f"{config.source_path}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
        self.labels, self.classes = _labels(self.names)
        self.index = _split_indices(len(self.names), config.test_fraction, config.seed)
        self.splits = {s: len(ix) for s, ix in self.index.items()}

    def load(self, split: str, i: int) -> tuple[Image.Image, int]:
        j = self.index[split][i]
        data = self.read(self.names[j])
        if not data:
            raise EmptyFile(self.names[j])
        return Image.open(io.BytesIO(data)), self.labels[j]

    def name_of(self, split: str, i: int) -> str:
        """Where sample ``i`` of ``split`` comes from, for messages."""
        return f"{self.where}/{self.names[self.index[split][i]]}"

    def read(self, name: str) -> bytes:
        raise NotImplementedError


class ImageFolder(_Listed):
    """JPEG/PNG/WebP files under a folder, recursively; first-level subfolders are classes."""

    def __init__(self, config: IngestConfig):
        self.root = Path(config.source_path)
        self.where = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        names = []
        for d, dirs, files in os.walk(self.root):
            dirs[:] = [x for x in dirs if not x.startswith(".")]  # .git, .DS_Store folders, ...
            names += [
                Path(d, f).relative_to(self.root).as_posix()
                for f in files
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        super().__init__(names, config)

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def check_member_name(archive: str, name: str) -> None:
    """Reject absolute names and ``..`` parts (path traversal) in an archive.

    Raises:
        DataError: naming the archive and the member.
    """
    if ".." not in name and name[:1] not in ("/", "\\") and name[1:2] != ":":
        return  # none of the marks below, without building anything: the stream's hot path
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in norm.split("/"):
        raise DataError(f"{archive}: unsafe member name {name!r} (absolute or '..')")


class ImageArchive(_Listed):
    """Images inside a tar (any compression) or zip archive; folders inside are classes."""

    def __init__(self, config: IngestConfig):
        self.path = config.source_path
        self.where = self.path
        if not Path(self.path).is_file():
            raise DataError(f"{self.path}: no such archive")
        self.is_zip = zipfile.is_zipfile(self.path)
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as z:
                    members = [i.filename for i in z.infolist() if not i.is_dir()]
            else:
                with tarfile.open(self.path) as t:
                    members = [m.name for m in t.getmembers() if m.isreg()]
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{self.path}: not a readable tar or zip archive ({e})") from None
        for name in members:
            check_member_name(self.path, name)
        names = [
            posixpath.normpath(m)
            for m in members
            if m.lower().endswith(IMAGE_EXTENSIONS)
            and not any(part.startswith(".") for part in posixpath.normpath(m).split("/"))
        ]
        self._member = {posixpath.normpath(m): m for m in members}
        self._handle = None
        super().__init__(names, config)

    def read(self, name: str) -> bytes:
        if self._handle is None:  # opened once per process
            self._handle = zipfile.ZipFile(self.path) if self.is_zip else tarfile.open(self.path)
        member = self._member[name]
        if self.is_zip:
            return self._handle.read(member)
        return self._handle.extractfile(member).read()

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}


# ---------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = ["disk", "ring", "square", "triangle", "cross"]


def synthetic_image(index: int, size: int, mode: str, seed: int) -> tuple[Image.Image, int]:
    """A shape (class label) of random color, place and size on a linear color gradient.

    Deterministic in ``(seed, index)``; structure a VAE can learn, not noise.
    """
    rng = np.random.default_rng([seed, index])
    channels = 3 if mode == "RGB" else 1
    label = int(rng.integers(len(SYNTHETIC_CLASSES)))
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5  # (H, W) in ~[0, 1]
    c0, c1 = rng.uniform(0, 0.5, (2, channels))
    image = c0 + (c1 - c0) * ramp[..., None]  # (H, W, C)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.12, 0.28)
    dx, dy = xx - cx, yy - cy
    dist = np.hypot(dx, dy)
    mask = [
        dist < r,
        np.abs(dist - 0.75 * r) < 0.25 * r,
        np.maximum(np.abs(dx), np.abs(dy)) < 0.8 * r,
        (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2),
        ((np.abs(dx) < r / 3) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 3) & (np.abs(dx) < r)),
    ][label]
    fg = rng.uniform(0.6, 1.0, channels)
    image = np.where(mask[..., None], fg, image)
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode), label


class Synthetic:
    """``synthetic_count`` generated images, split by ``test_fraction``."""

    def __init__(self, config: IngestConfig):
        self.size, self.mode, self.seed = config.synthetic_size, config.synthetic_mode, config.seed
        self.classes = SYNTHETIC_CLASSES
        n_test = int(round(config.synthetic_count * config.test_fraction))
        self.offset = {"train": 0, "test": config.synthetic_count - n_test}
        self.splits = {"train": config.synthetic_count - n_test, "test": n_test}

    def load(self, split: str, i: int) -> tuple[Image.Image, int]:
        return synthetic_image(self.offset[split] + i, self.size, self.mode, self.seed)


def open_source(config: IngestConfig):
    """The source named by ``config.source``."""
    if config.source == "fashion_mnist":
        return FashionMNIST(config.source_path)
    if config.source == "folder":
        return ImageFolder(config)
    if config.source == "archive":
        return ImageArchive(config)
    return Synthetic(config)
