"""Classify an uploaded clip with a trained model, in the API process.

The RGB clip (``.avi`` / ``.mp4``) is decoded straight from the upload's spooled file with
``models.data.ntu.read_video``; the skeleton is an NTU ``.skeleton`` text file or a ``.npy``
array of shape T×V×3 or T×V×3×M (loaded with ``allow_pickle=False``). The skeleton is
scaled with the checkpoint's normalisation constants and resampled to the model's frame
count, exactly as the training cache does. Loaded models are kept in a small LRU.

Problems with an upload raise :class:`UploadError` (→ 422, naming the field) or
:class:`MediaTypeError` (→ 415); nothing is written to disk except the checkpoint cache.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from models.checkpoint import load_checkpoint, resolve_device
from models.config import ModelConfig
from models.data import ntu
from service.store import Store, materialize_dir

VIDEO_TYPES = {".avi": {"video/x-msvideo", "video/avi", "video/msvideo", "video/vnd.avi"},
               ".mp4": {"video/mp4"}}
SKELETON_TYPES = {".skeleton": {"text/plain"},
                  ".npy": {"application/x-npy", "application/npy", "application/x-numpy"}}
# What curl and most clients send for a file they do not recognise.
GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream"}


class UploadError(ValueError):
    """An upload cannot be used: corrupt, malformed, or shaped unlike the model's input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class MediaTypeError(ValueError):
    """An upload of a media type this endpoint does not take."""


@dataclass
class Upload:
    field: str
    filename: str
    content_type: str
    file: BinaryIO


def check_media_type(upload: Upload, allowed: dict[str, set[str]]) -> str:
    """The upload's extension, if both it and its declared type are acceptable."""
    suffix = Path(upload.filename or "").suffix.lower()
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if suffix not in allowed:
        raise MediaTypeError(f"{upload.field}: {upload.filename!r} ({content_type or 'no type'}) is not one of "
                             f"{', '.join(sorted(allowed))}")
    if content_type not in allowed[suffix] | GENERIC_TYPES:
        raise MediaTypeError(f"{upload.field}: media type {content_type!r} does not match a {suffix} file "
                             f"(expected {', '.join(sorted(allowed[suffix]))} or application/octet-stream)")
    return suffix


def decode_video(upload: Upload, cfg: ModelConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """(3, T, S, S) float in [0, 1] at the model's geometry."""
    check_media_type(upload, VIDEO_TYPES)
    upload.file.seek(0)
    try:
        clip = ntu.read_video(upload.file, cfg.rgb_frames, cfg.rgb_size, name=upload.filename)
    except ntu.VideoDecodeError as e:
        raise UploadError(upload.field, f"corrupt or unreadable video {upload.filename!r}: {e.message}") from None
    return torch.from_numpy(clip).float().div_(255.0), {"frames": cfg.rgb_frames, "size": cfg.rgb_size}


def _skeleton_array(upload: Upload, suffix: str) -> np.ndarray:
    """The upload as ``(T, V, 3, M)`` float32, before any model-specific check."""
    upload.file.seek(0)
    data = upload.file.read()
    if not data:
        raise UploadError(upload.field, f"{upload.filename!r} is empty")
    if suffix == ".skeleton":
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise UploadError(upload.field, f"{upload.filename}: line {line}: not a text file (non-ASCII byte)") \
                from None
        try:
            return ntu.read_skeleton_text(text, upload.filename)
        except ntu.SkeletonFormatError as e:
            raise UploadError(upload.field, f"malformed skeleton file: {e}") from None
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UploadError(upload.field, f"{upload.filename!r} is not a readable .npy array ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        raise UploadError(upload.field, f"{upload.filename!r}: expected a numeric array, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise UploadError(upload.field, f"{upload.filename!r} has shape {tuple(array.shape)}; expected T×V×3 or "
                                        "T×V×3×M (frames, joints, xyz, bodies)")
    if not np.isfinite(array).all():
        raise UploadError(upload.field, f"{upload.filename!r} holds NaN or infinite coordinates")
    return array.astype(np.float32)


def decode_skeleton(upload: Upload, cfg: ModelConfig, meta: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(3, T, V, M) float in [0, 1]: checked against the model, scaled, resampled."""
    suffix = check_media_type(upload, SKELETON_TYPES)
    array = _skeleton_array(upload, suffix)
    frames, joints, coords, bodies = array.shape
    if frames < 1:
        raise UploadError(upload.field, "the skeleton has no frames")
    if joints != cfg.joints:
        raise UploadError(upload.field, f"the skeleton has {joints} joints per body; this model expects {cfg.joints}")
    if coords != 3:
        raise UploadError(upload.field, f"the skeleton has {coords} coordinates per joint; expected 3 (x, y, z)")
    if bodies > cfg.persons:
        raise UploadError(upload.field, f"the skeleton has {bodies} bodies; this model takes at most {cfg.persons}")
    if bodies < cfg.persons:
        array = np.concatenate([array, np.zeros((frames, joints, 3, cfg.persons - bodies), np.float32)], axis=3)
    # The order of the training cache (models.data.cache.prepare): resample, then scale.
    norm = meta["normalisation"]
    resampled = ntu.resample_skeleton(array, cfg.skel_frames)
    scaled = ntu.scale_skeleton(resampled, norm["skel_min"], norm["skel_max"])
    skel = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1, 3)))
    return skel, {"frames": frames, "resampled_to": cfg.skel_frames, "joints": joints, "bodies": bodies}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict[str, Any]
    cfg: ModelConfig
    device: torch.device


class ModelCache:
    """Trained models loaded in this process, least recently used evicted first."""

    def __init__(self, store: Store, cache_dir: Path, size: int = 4, device: str | None = None):
        self.store, self.cache_dir, self.size = store, Path(cache_dir), max(1, size)
        self.device = resolve_device(None if device in (None, "", "auto") else device)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, model_id: str, artifact_prefix: str) -> tuple[LoadedModel, bool]:
        """The loaded model and whether it had to be loaded now."""
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id], False
            load_lock = self._loading.setdefault(model_id, threading.Lock())
        with load_lock:  # one thread loads a model; the others wait for it
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id], False
            directory = materialize_dir(self.store, artifact_prefix, self.cache_dir / model_id)
            model, meta = load_checkpoint(directory, device=self.device)
            loaded = LoadedModel(model=model, meta=meta, cfg=ModelConfig.from_dict(meta["model"]), device=self.device)
            with self._lock:
                self._models[model_id] = loaded
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
                self._loading.pop(model_id, None)
            return loaded, True


# Decoding and inference are CPU-bound: more of them at once than there are cores only adds
# thread switching, so requests beyond that wait here (queueing, not failing).
_COMPUTE = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


def classify(loaded: LoadedModel, video: Upload | None, skeleton: Upload | None, top_k: int = 5) -> dict[str, Any]:
    """Top-k classes of one clip; at least the modalities the model's arch uses."""
    with _COMPUTE:
        return _classify(loaded, video, skeleton, top_k)


def _classify(loaded: LoadedModel, video: Upload | None, skeleton: Upload | None, top_k: int) -> dict[str, Any]:
    cfg, meta = loaded.cfg, loaded.meta
    needs_video, needs_skeleton = cfg.arch in ("fusion", "rgb"), cfg.arch in ("fusion", "skeleton")
    if needs_video and video is None:
        raise UploadError("video", f"a {cfg.arch} model needs the RGB clip (.avi or .mp4)")
    if needs_skeleton and skeleton is None:
        raise UploadError("skeleton", f"a {cfg.arch} model needs the skeleton (.skeleton or .npy)")
    t0 = time.perf_counter()
    inputs: dict[str, Any] = {}
    if video is not None:
        rgb, inputs["video"] = decode_video(video, cfg)
    else:
        rgb = torch.zeros(3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size)
    if skeleton is not None:
        skel, inputs["skeleton"] = decode_skeleton(skeleton, cfg, meta)
    else:
        skel = torch.zeros(3, cfg.skel_frames, cfg.joints, cfg.persons)
    t1 = time.perf_counter()
    with torch.inference_mode():
        logits = loaded.model(rgb[None].to(loaded.device), skel[None].to(loaded.device)).logits[0]
        probs = torch.softmax(logits.float(), dim=0).cpu()
    t2 = time.perf_counter()
    names = meta["class_names"]
    k = max(1, min(top_k, len(names)))
    values, indices = torch.topk(probs, k)
    top = [{"index": int(i), "name": names[int(i)], "probability": float(v)} for v, i in zip(values, indices)]
    return {"top": top, "inputs": inputs, "decode_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3}
