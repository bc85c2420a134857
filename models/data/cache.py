"""Decode an NTU-layout dataset once into a compact cache, and read it as a Dataset.

``prepare(root, cache_dir, ...)`` writes::

    cache_dir/meta.json     format, class names, sizes, per-sample ids, skel_min/skel_max,
                            skipped samples (see ``prepare``)
    cache_dir/rgb.npy       uint8   (N, 3, rgb_frames, rgb_size, rgb_size)
    cache_dir/skel.npy      float32 (N, 3, skel_frames, 25, 2), already scaled to [0, 1]
    cache_dir/labels.npy    int64   (N,)

Plain ``.npy`` files (no pickle) that ``ClipDataset`` memory-maps, so a cache far larger
than RAM can be trained on. Training and evaluation never decode video again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .ntu import (BODIES, JOINTS, PROTOCOLS, EmptySkeletonError, SampleId, class_names,
                  find_samples, in_train_split, read_skeleton_file, read_video,
                  resample_skeleton, scale_skeleton)

CACHE_FORMAT = "robustact.cache/v1"
META_FILE = "meta.json"
RGB_FILE = "rgb.npy"
SKEL_FILE = "skel.npy"
LABELS_FILE = "labels.npy"
SPLITS = ("train", "test", "all")


class SkippedSampleWarning(UserWarning):
    """``prepare`` left a sample out (no skeleton body, or a modality's file missing)."""


def _present_coords(arr: np.ndarray) -> np.ndarray:
    """(K, 3) x, y, z of every joint of every body present in a frame of (T, V, 3, M)."""
    bodies = np.moveaxis(arr, 3, 1)  # (T, M, V, 3)
    present = np.any(bodies != 0, axis=(2, 3))
    return bodies[present].reshape(-1, 3)


def _check_target(cache_dir: Path) -> None:
    """Refuse to replace a directory that is not a cache (never delete a user's files)."""
    if not cache_dir.exists():
        return
    if not cache_dir.is_dir():
        raise FileExistsError(f"{cache_dir}: exists and is not a directory")
    if any(cache_dir.iterdir()) and not (cache_dir / META_FILE).is_file():
        raise FileExistsError(f"{cache_dir}: exists, is not empty and holds no {META_FILE}; "
                              "refusing to replace it")


def prepare(root: str | os.PathLike, cache_dir: str | os.PathLike, rgb_frames: int,
            rgb_size: int, skel_frames: int,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Decode every sample of the NTU-layout dataset at ``root`` into ``cache_dir``.

    Per sample: the skeleton is parsed (two most active bodies), resampled to
    ``skel_frames`` by linear interpolation and min-max scaled to [0, 1]; the video is
    decoded to ``rgb_frames`` uniformly sampled frames, shorter side resized to
    ``rgb_size`` and centre-cropped (see ``ntu.read_video``).

    Skipped with a ``SkippedSampleWarning`` naming the sample (and listed under
    ``"skipped"`` in the meta): samples whose ``.skeleton`` has no body in any frame, and
    samples whose skeleton or video file is missing (both modalities are needed). A
    malformed ``.skeleton`` raises ``SkeletonFormatError`` (file and line) and an
    undecodable video ``VideoDecodeError``: a corrupt download should be fixed, not hidden.

    Skeleton scaling constants: ``skel_min`` / ``skel_max`` are the per-axis (x, y, z)
    minimum and maximum over every joint of every body present in any frame of the
    **X-Sub training split** (before resampling, which cannot leave that range). One pair
    serves both protocols so one cache serves both; the few X-View test clips of X-Sub
    training subjects thus inform 6 numbers, which we accept. If the dataset has no X-Sub
    training subject the constants come from all samples, with a warning, and
    ``skel_range_source`` says so. Values outside the range (test clips) are clipped.

    The cache is written to a temporary directory next to ``cache_dir`` and renamed into
    place only when complete, so a failure leaves no partial cache (and an existing cache
    at ``cache_dir`` is replaced only on success). A non-empty ``cache_dir`` that is not a
    cache is never replaced (FileExistsError).

    ``progress(done, total)`` is called after each step; there are two steps per sample
    (skeleton, then video). Returns a summary: the ``meta.json`` content without the
    per-sample ``"samples"`` list (56 880 entries on the real dataset), plus ``"cache_dir"``.
    """
    started = time.perf_counter()
    for name, value in (("rgb_frames", rgb_frames), ("rgb_size", rgb_size),
                        ("skel_frames", skel_frames)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    root, cache_dir = Path(root), Path(cache_dir)
    _check_target(cache_dir)
    names = class_names(root)
    samples = find_samples(root)
    if not samples:
        raise ValueError(f"{root}: no sample found")
    total = 2 * len(samples)
    done = 0

    def step(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling of the target (same file system, so the final rename is atomic); plain
    # mkdir rather than mkdtemp so the cache gets the usual umask permissions, not 0700.
    tmp = cache_dir.with_name(f".{cache_dir.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
        # Pass 1: skeletons. Unscaled, resampled arrays go to a scratch memmap because the
        # scaling constants are only known once every training skeleton has been read.
        scratch = np.lib.format.open_memmap(
            tmp / "skel_raw.npy", mode="w+", dtype=np.float32,
            shape=(len(samples), skel_frames, JOINTS, 3, BODIES))
        kept, skipped, records = [], [], []
        lo_train = np.full(3, np.inf)
        hi_train = np.full(3, -np.inf)
        lo_all, hi_all = lo_train.copy(), hi_train.copy()
        for index, sample in enumerate(samples):
            sid = sample.id
            if sid.label >= len(names):
                raise ValueError(f"{sample.name}: action A{sid.action:03d} but the dataset has "
                                 f"only {len(names)} class names")
            reason = None
            if sample.skeleton is None:
                reason = "no .skeleton file"
            elif sample.video is None:
                reason = "no _rgb.avi file"
            else:
                try:
                    raw = read_skeleton_file(sample.skeleton)
                except EmptySkeletonError as exc:
                    reason = f"no skeleton body ({exc.message})"
            if reason is not None:
                warnings.warn(f"skipping sample {sample.name}: {reason}", SkippedSampleWarning,
                              stacklevel=2)
                skipped.append({"name": sample.name, "reason": reason})
                step()
                continue
            coords = _present_coords(raw)
            lo_all = np.minimum(lo_all, coords.min(axis=0))
            hi_all = np.maximum(hi_all, coords.max(axis=0))
            if in_train_split(sid, "xsub"):
                lo_train = np.minimum(lo_train, coords.min(axis=0))
                hi_train = np.maximum(hi_train, coords.max(axis=0))
            scratch[len(kept)] = resample_skeleton(raw, skel_frames)
            kept.append(sample)
            records.append({
                "name": sample.name, "setup": sid.setup, "camera": sid.camera,
                "performer": sid.performer, "replication": sid.replication,
                "action": sid.action, "label": sid.label,
                "skeleton_frames": int(raw.shape[0]),
                "bodies": int(np.any(raw != 0, axis=(0, 1, 2)).sum()),
            })
            step()
        if not kept:
            raise ValueError(f"{root}: no usable sample ({len(skipped)} skipped)")
        if np.all(np.isfinite(lo_train)):
            skel_min, skel_max, source = lo_train, hi_train, "xsub-train"
        else:
            warnings.warn(f"{root}: no X-Sub training subject; skeleton scaling constants "
                          "come from all samples", stacklevel=2)
            skel_min, skel_max, source = lo_all, hi_all, "all-samples"
        skel_min = [float(v) for v in skel_min]
        skel_max = [float(v) for v in skel_max]

        n = len(kept)
        skel = np.lib.format.open_memmap(tmp / SKEL_FILE, mode="w+", dtype=np.float32,
                                         shape=(n, 3, skel_frames, JOINTS, BODIES))
        for i in range(n):
            # (T, V, 3, M) -> the model layout (3, T, V, M)
            skel[i] = scale_skeleton(scratch[i], skel_min, skel_max).transpose(2, 0, 1, 3)
        skel.flush()
        del skel, scratch
        os.remove(tmp / "skel_raw.npy")
        labels = np.array([s.id.label for s in kept], dtype=np.int64)
        np.save(tmp / LABELS_FILE, labels, allow_pickle=False)

        # Pass 2: videos.
        if skipped:
            step(len(skipped))  # skipped samples have no video step
        rgb = np.lib.format.open_memmap(tmp / RGB_FILE, mode="w+", dtype=np.uint8,
                                        shape=(n, 3, rgb_frames, rgb_size, rgb_size))
        for i, sample in enumerate(kept):
            rgb[i] = read_video(sample.video, rgb_frames, rgb_size)
            step()
        rgb.flush()
        del rgb

        ids = [s.id for s in kept]
        meta = {
            "format": CACHE_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "root": str(root.resolve()),
            "class_names": names,
            "num_classes": len(names),
            "rgb_frames": int(rgb_frames),
            "rgb_size": int(rgb_size),
            "skel_frames": int(skel_frames),
            "joints": JOINTS,
            "persons": BODIES,
            "arrays": {
                "rgb": {"file": RGB_FILE, "dtype": "uint8", "layout": "N,3,T,H,W",
                        "shape": [n, 3, int(rgb_frames), int(rgb_size), int(rgb_size)]},
                "skel": {"file": SKEL_FILE, "dtype": "float32", "layout": "N,3,T,V,M",
                         "shape": [n, 3, int(skel_frames), JOINTS, BODIES]},
                "labels": {"file": LABELS_FILE, "dtype": "int64", "shape": [n]},
            },
            "skel_min": skel_min,
            "skel_max": skel_max,
            "skel_range_source": source,
            "num_samples": n,
            "samples": records,
            "skipped": skipped,
            "splits": {p: {"train": sum(in_train_split(i, p) for i in ids),
                           "test": sum(not in_train_split(i, p) for i in ids)}
                       for p in PROTOCOLS},
            "seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _swap_into_place(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {k: v for k, v in meta.items() if k != "samples"}
    summary["cache_dir"] = str(cache_dir)
    return summary


def _swap_into_place(tmp: Path, cache_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``cache_dir``, replacing an existing cache."""
    _check_target(cache_dir)  # the target may have changed while we were decoding
    if cache_dir.exists():
        old = cache_dir.with_name(f".{cache_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(cache_dir, old)
        os.rename(tmp, cache_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, cache_dir)


def load_meta(cache_dir: str | os.PathLike) -> dict:
    """Read and check ``cache_dir/meta.json``; raise if missing or of another format."""
    path = Path(cache_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir}: no {META_FILE}; run prepare first")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {meta.get('format')!r}, expected "
                         f"{CACHE_FORMAT!r}; run prepare again")
    return meta


class ClipDataset(Dataset):
    """One split of a prepared cache.

    ``protocol`` is "xsub" or "xview"; ``split`` is "train", "test" or "all" (every
    sample, whatever the protocol). Items are ``(rgb, skel, label)``: rgb float32
    ``(3, T, H, W)`` in [0, 1], skel float32 ``(3, T, V, M)`` in [0, 1] (absent bodies 0),
    label int.

    Attributes: ``meta`` (the cache's meta.json), ``class_names``, ``num_classes``,
    ``indices`` (int64 rows of the cache in this split), ``labels`` (int64, per item),
    ``sample_names``, ``skel_min`` / ``skel_max`` (3 floats each; store them with a model
    so uploads are scaled the same way).

    Arrays are memory-mapped lazily in each process (a DataLoader worker opens its own).
    """

    def __init__(self, cache_dir: str | os.PathLike, protocol: str = "xsub",
                 split: str = "train"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cache_dir = Path(cache_dir)
        self.meta = load_meta(self.cache_dir)
        self.protocol, self.split = protocol, split
        samples = self.meta["samples"]
        all_labels = np.load(self.cache_dir / LABELS_FILE, allow_pickle=False)
        if all_labels.shape != (len(samples),):
            raise ValueError(f"{self.cache_dir}: {LABELS_FILE} does not match {META_FILE}")
        if split == "all":
            rows = range(len(samples))
        else:
            want = split == "train"
            rows = [i for i, s in enumerate(samples)
                    if in_train_split(_sample_id(s), protocol) == want]
        self.indices = np.asarray(list(rows), dtype=np.int64)
        if self.indices.size == 0:
            raise ValueError(f"{self.cache_dir}: the {protocol}/{split} split is empty")
        self.labels = all_labels[self.indices].astype(np.int64)
        self._rgb = self._skel = None

    # -- metadata ---------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def skel_min(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.meta["skel_min"])

    @property
    def skel_max(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.meta["skel_max"])

    @property
    def sample_names(self) -> list[str]:
        return [self.meta["samples"][i]["name"] for i in self.indices]

    # -- data -------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._rgb is None:
            self._rgb = np.load(self.cache_dir / RGB_FILE, mmap_mode="r", allow_pickle=False)
            self._skel = np.load(self.cache_dir / SKEL_FILE, mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        self._open()
        row = int(self.indices[i])
        rgb = torch.from_numpy(np.asarray(self._rgb[row], dtype=np.float32)).div_(255.0)
        skel = torch.from_numpy(np.array(self._skel[row], dtype=np.float32))
        return rgb, skel, int(self.labels[i])

    def __getstate__(self):
        # Memory maps are reopened in the receiving process instead of being pickled.
        state = self.__dict__.copy()
        state["_rgb"] = state["_skel"] = None
        return state

    def subset(self, n: int, seed: int | None = None) -> "ClipDataset":
        """A view on at most ``n`` items of this split, balanced over classes.

        Items are taken round-robin over the classes (in cache order, or shuffled within
        each class with ``seed``), so a small subset still covers every class.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = np.random.default_rng(seed) if seed is not None else None
        per_class = []
        for label in np.unique(self.labels):
            positions = np.flatnonzero(self.labels == label)
            if rng is not None:
                positions = rng.permutation(positions)
            per_class.append(list(positions))
        chosen: list[int] = []
        while len(chosen) < min(n, len(self)):
            for positions in per_class:
                if positions and len(chosen) < n:
                    chosen.append(positions.pop(0))
        chosen.sort()
        view = object.__new__(ClipDataset)
        view.__dict__.update(self.__getstate__())
        view.indices = self.indices[chosen]
        view.labels = self.labels[chosen]
        return view

    def __repr__(self) -> str:
        return (f"ClipDataset({str(self.cache_dir)!r}, protocol={self.protocol!r}, "
                f"split={self.split!r}, items={len(self)}, classes={self.num_classes})")


def _sample_id(record: dict) -> SampleId:
    return SampleId(record["setup"], record["camera"], record["performer"],
                    record["replication"], record["action"])
