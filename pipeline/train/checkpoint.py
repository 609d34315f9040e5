"""Checkpoint directories: weights that load without pickle, verified by checksums.

Layout of one checkpoint directory::

    model.safetensors   the VAE, unwrapped from DDP (no ``module.`` prefix)
    ema.safetensors     EMA weights (optional)
    optim.pt            optimizer + scheduler state, loaded with ``torch.load(weights_only=True)``
    state.json          step, epoch, data-stream state, the full job config, MLflow run id
    checksums.json      sha256 of every file above; written last

A tampered or truncated file fails :func:`load` with an error naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError, first_line
from pipeline.model.io import load_weights, save_weights

CHECKSUMS = "checksums.json"


class CheckpointError(PipelineError):
    pass


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/FSDP-style wrappers."""
    return getattr(model, "module", model)


def weights_bytes(model: torch.nn.Module) -> bytes:
    return save_weights(unwrap(model))


def save(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer=None,
    scheduler=None,
    ema: torch.nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created). Returns the directory. ``scaler`` (fp16
    training): its scale and growth tracker go into ``optim.pt`` beside the optimizer's state,
    so a resumed run does not restart the scale search from 2**16."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {"model.safetensors": weights_bytes(model)}
    if ema is not None:
        files["ema.safetensors"] = weights_bytes(ema)
    if optimizer is not None:
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "scaler": scaler.state_dict() if scaler is not None else {},
            },
            buf,
        )
        files["optim.pt"] = buf.getvalue()
    files["state.json"] = json.dumps(state, indent=1, sort_keys=True).encode()
    # Until checksums.json is (re)published, the folder is not a checkpoint for load():
    # a write that fails halfway leaves no checkpoint, never a mixed one.
    (d / CHECKSUMS).unlink(missing_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    tmp = d / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(sums, indent=1, sort_keys=True))
    tmp.replace(d / CHECKSUMS)
    return d


def _read_verified(d: Path, name: str, sums: dict[str, str]) -> bytes:
    path = d / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from checkpoint") from None
    if hashlib.sha256(data).hexdigest() != sums.get(name):
        raise CheckpointError(f"{path}: checksum mismatch (tampered or truncated checkpoint)")
    return data


def _parse(d: Path, name: str, sums: dict[str, str], parse) -> Any:
    """``parse`` the verified bytes of ``name``; a parse error names the file, in one line."""
    data = _read_verified(d, name, sums)
    try:
        return parse(data)
    except Exception as e:  # safetensors/torch/json errors on a corrupt or hostile file
        first = first_line(e, 200)
        raise CheckpointError(f"{d / name}: unreadable ({type(e).__name__}: {first})") from None


def _no_pickle_load(data: bytes) -> Any:
    # weights_only: torch's restricted unpickler, which builds tensors and plain containers
    # only and refuses every other global (no code runs from a hostile optim.pt)
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def load(directory: str | Path, *, with_optimizer: bool = True) -> dict[str, Any]:
    """Read and verify a checkpoint. No pickle is executed.

    Returns:
        ``{"model": state_dict, "ema": state_dict | None, "optim": dict | None, "state": dict}``.

    Raises:
        CheckpointError: naming the missing, tampered, truncated or unreadable file.
    """
    d = Path(directory)
    try:
        sums = json.loads((d / CHECKSUMS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        sums = None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{d / CHECKSUMS}: missing or unreadable: not a complete checkpoint")
    out: dict[str, Any] = {"model": _parse(d, "model.safetensors", sums, load_weights)}
    out["ema"] = (
        _parse(d, "ema.safetensors", sums, load_weights) if "ema.safetensors" in sums else None
    )
    out["optim"] = None
    if with_optimizer and "optim.pt" in sums:
        out["optim"] = _parse(d, "optim.pt", sums, _no_pickle_load)
    out["state"] = _parse(d, "state.json", sums, json.loads)
    return out
