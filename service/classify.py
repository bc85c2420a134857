"""Classify an uploaded clip with a trained model.

The uploads are decoded in decoder processes (:mod:`service.decoder`), within limits of
size, time and memory, so that a hostile clip cannot take the API down: the RGB clip
(``.avi`` / ``.mp4``) by ``models.data.ntu.read_video``; the skeleton, an NTU ``.skeleton``
text file, a ``.npy`` array of shape T×V×C or T×V×C×M (loaded with ``allow_pickle=False``)
or, for a 2-D 22-joint model (iMiGUE-style), OpenPose ``.json`` (a JSON array of the
per-frame documents OpenPose writes, or ``{"frames": [...]}``, read by
``models.data.openpose.read_openpose_frames`` as in training), resampled to the model's
frame count and scaled with the checkpoint's normalisation constants, exactly as the
training cache does. The forward pass runs here, on models kept in a small LRU.

A missing modality raises :class:`UploadError` (→ 422, naming the field), an unaccepted
media type :class:`MediaTypeError` (→ 415), and a clip that cannot be decoded
``service.decoder.DecodeError`` (→ its ``status``: 422, or 503 when the decoder failed).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from robustact.models.checkpoint import load_checkpoint, resolve_device
from robustact.models.config import ModelConfig
from robustact.service.decoder import SKELETON, VIDEO, DecoderPool, Geometry, decode
from robustact.service.store import Store, materialize_dir

VIDEO_TYPES = {".avi": {"video/x-msvideo", "video/avi", "video/msvideo", "video/vnd.avi"},
               ".mp4": {"video/mp4"}}
SKELETON_TYPES = {".skeleton": {"text/plain"},
                  ".npy": {"application/x-npy", "application/npy", "application/x-numpy"},
                  ".json": {"application/json", "text/plain"}}  # OpenPose frames
MEDIA_TYPES = {VIDEO: VIDEO_TYPES, SKELETON: SKELETON_TYPES}
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
    """(3, T, S, S) float in [0, 1] at the model's geometry, decoded in this process with
    no limit: for benchmarks. The API decodes through a ``DecoderPool`` (``classify``)."""
    return _decode_here(VIDEO, upload, Geometry.of(cfg))


def decode_skeleton(upload: Upload, cfg: ModelConfig, meta: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(C, T, V, M) float in [0, 1]: checked against the model, resampled, scaled; in this
    process with no limit, like ``decode_video``."""
    return _decode_here(SKELETON, upload, Geometry.of(cfg, meta))


def _decode_here(kind: str, upload: Upload, geometry: Geometry) -> tuple[torch.Tensor, dict[str, Any]]:
    suffix = check_media_type(upload, MEDIA_TYPES[kind])
    upload.file.seek(0)
    array, inputs = decode(kind, upload.file, suffix, upload.filename, upload.field, geometry)
    return torch.from_numpy(array), inputs


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

    def evict(self, model_id: str) -> None:
        """Forget a model (it was deleted): drop it from memory and its local checkpoint copy."""
        with self._lock:
            self._models.pop(model_id, None)
        shutil.rmtree(self.cache_dir / model_id, ignore_errors=True)

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


def classify(loaded: LoadedModel, video: Upload | None, skeleton: Upload | None, top_k: int,
             decoders: DecoderPool) -> dict[str, Any]:
    """Top-k classes of one clip; at least the modalities the model's arch uses.

    Both media types are checked before anything is decoded. The uploads then go to the
    decoder pool one after the other: a request holds at most one decoder, so requests
    cannot deadlock waiting for each other's, and with one decoder per core concurrent
    requests already keep every core busy (the forward pass runs here). How many requests
    get here at once is bounded by the API's admission control (``service.middleware``).
    """
    cfg, meta = loaded.cfg, loaded.meta
    needs_video, needs_skeleton = cfg.arch in ("fusion", "rgb"), cfg.arch in ("fusion", "skeleton")
    if needs_video and video is None:
        raise UploadError("video", f"a {cfg.arch} model needs the RGB clip (.avi or .mp4)")
    if needs_skeleton and skeleton is None:
        raise UploadError("skeleton", f"a {cfg.arch} model needs the skeleton (.skeleton, .npy or OpenPose .json)")
    uploads = [(kind, upload, check_media_type(upload, MEDIA_TYPES[kind]))
               for kind, upload in ((VIDEO, video), (SKELETON, skeleton)) if upload is not None]
    geometry = Geometry.of(cfg, meta)
    t0 = time.perf_counter()
    decoded: dict[str, torch.Tensor] = {}
    inputs: dict[str, Any] = {}
    for kind, upload, suffix in uploads:
        array, inputs[kind] = decoders.decode(kind, upload.file, suffix, upload.filename, upload.field, geometry)
        decoded[kind] = torch.from_numpy(array)
    rgb = decoded.get(VIDEO, torch.zeros(geometry.shape(VIDEO)))
    skel = decoded.get(SKELETON, torch.zeros(geometry.shape(SKELETON)))
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
