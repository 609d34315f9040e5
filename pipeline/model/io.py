"""Model weights as safetensors bytes (no pickle on load) and rebuilding a VAE from a dict."""

from __future__ import annotations

import json
import struct
from dataclasses import fields
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError

from .config import ModelConfig
from .vae import VAE


def save_weights(
    model: nn.Module | dict[str, Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """The model's state dict as safetensors bytes (tensors copied to contiguous CPU memory).

    Args:
        model: a module or a state dict.
        metadata: optional string-to-string header entries (e.g. the JSON model config).
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return safetensors.torch.save(tensors, metadata=metadata)


def load_weights(data: bytes) -> dict[str, Tensor]:
    """A state dict from ``save_weights`` bytes; parsing executes no pickle."""
    return safetensors.torch.load(data)


def weights_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` header of safetensors bytes ({} if none)."""
    (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 little-endian header length + JSON
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def config_from_dict(config_dict: dict[str, Any]) -> ModelConfig:
    """A validated ``ModelConfig`` from a plain dict of its fields.

    Raises:
        ConfigError: unknown key or invalid value (naming the key).
    """
    known = {f.name for f in fields(ModelConfig)}
    for key in config_dict:
        if key not in known:
            raise ConfigError(key, f"unknown ModelConfig field (known: {sorted(known)})")
    return ModelConfig(**config_dict)


def build_model(config_dict: dict[str, Any]) -> VAE:
    """A freshly initialised VAE from a plain dict of ``ModelConfig`` fields (``asdict``)."""
    return VAE.from_config(config_from_dict(config_dict))


def load_model(config_dict: dict[str, Any], data: bytes, device: str = "cpu") -> VAE:
    """``build_model`` then load ``save_weights`` bytes strictly; returned in eval mode."""
    model = build_model(config_dict)
    model.load_state_dict(load_weights(data), strict=True)
    return model.to(torch.device(device)).eval()
