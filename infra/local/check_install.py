"""The last step of `make install`: check what the venv resolved against the lock.

    python infra/local/check_install.py {cpu|cuda} requirements/lock-cpu.txt

Prints the torch version and build, and exits 1 with one `ERROR:` line when the torch build is
not the one asked for (a CUDA build where TORCH=cpu, or the reverse), when an installed version
differs from the lock's pin, or when the lock no longer covers pyproject.toml's requirements.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "vae-pipeline"
EXTRAS = ("dev",)  # the extras `make install` locks and installs


def fail(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(1)


def read_pins(lock: str) -> dict[str, str]:
    pins = {}
    with open(lock) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            if m:
                pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def main(build: str, lock: str) -> None:
    if build not in ("cpu", "cuda"):
        fail(f"TORCH={build!r}: use TORCH=cpu or TORCH=cuda")
    pins = read_pins(lock)
    have = installed()

    import torch

    cuda = torch.version.cuda
    kind = f"CUDA {cuda} build" if cuda else "CPU build"
    print(f"torch {torch.__version__} ({kind}, torch.version.cuda={cuda}) from {lock}")
    rerun = f"rm -rf .venv && make install TORCH={build}"
    if build == "cpu" and (cuda or torch.version.hip):
        fail(
            f"TORCH=cpu asked for the CPU build, but the venv has torch {torch.__version__} "
            f"({kind}); {rerun}"
        )
    if build == "cuda" and not cuda:
        fail(
            f"TORCH=cuda asked for a CUDA build, but the venv has torch {torch.__version__} "
            f"(no CUDA); {rerun}"
        )

    wrong = sorted(
        f"{n} {have.get(n, 'missing')} (lock: {v})" for n, v in pins.items() if have.get(n) != v
    )
    if wrong:
        fail(f"{len(wrong)} package(s) differ from {lock}: {', '.join(wrong[:5])}; {rerun}")

    # pyproject.toml's requirements (with the locked extras) must be met by the lock's pins:
    # a dependency added or narrowed there without `make lock` shows up here.
    env_extras = [{"extra": e} for e in ("", *EXTRAS)]
    unmet = []
    for text in metadata.requires(PROJECT) or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate(env) for env in env_extras):
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.append(str(req))
    if unmet:
        fail(f"{lock} is stale: it does not satisfy {', '.join(unmet)}; run `make lock`")

    extra = sorted(set(have) - set(pins) - {canonicalize_name(PROJECT)})
    note = (
        f"; {len(extra)} not in the lock, left from an older install (rm -rf .venv && "
        f"make install drops them): {' '.join(extra)}"
        if extra
        else ""
    )
    print(f"OK: TORCH={build}, {len(pins)} packages match {lock}{note}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: python infra/local/check_install.py {cpu|cuda} LOCKFILE")
    main(sys.argv[1], sys.argv[2])
