"""Checkpoints: ``model.safetensors`` + ``config.json``. Nothing is ever unpickled.

``config.json`` holds everything needed to rebuild and use the model:
``{"format": "robustact.checkpoint/v1", "model": ModelConfig, "preset", "class_names",
"normalisation": {"skel_min": [x, y, z], "skel_max": [x, y, z]}, "train": TrainConfig, ...}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .fusion import build_model

CHECKPOINT_FORMAT = "robustact.checkpoint/v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write: contiguous CPU tensors, no shared storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written ``tmp`` directory into ``final`` (atomic on one filesystem)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> dict:
    """Write weights and config into ``directory`` atomically; returns the stored config."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state_tensors(model), str(tmp / WEIGHTS_FILE))
    config = {"format": CHECKPOINT_FORMAT, **meta, "weights_sha256": file_sha256(tmp / WEIGHTS_FILE)}
    write_json(tmp / CONFIG_FILE, config)
    replace_dir(tmp, directory)
    return config


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a robustact checkpoint)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format is {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return config


def load_checkpoint(directory: str | Path, device: str | torch.device | None = None):
    """Rebuild the model from ``config.json`` and load its safetensors weights.

    Returns ``(model, config)`` with the model in eval mode on ``device``.
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable weights ({e})") from None
    try:
        model = build_model(ModelConfig.from_dict(config["model"]))
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not match the config ({e})") from None
    model.to(device or "cpu").eval()
    return model, config


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/"auto" → CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
