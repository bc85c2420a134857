"""Decode a dataset once into a compact cache, and read it as a Dataset.

The dataset is in the NTU RGB+D layout or the iMiGUE-style one (``models.data.layouts``:
the cache's meta records ``layout``, ``joints``, ``skel_channels`` C and ``persons`` M; an
NTU cache has 25 joints, C = 3, M = 2, an iMiGUE-style one 22 joints, C = 2, M = 1).

``prepare(root, cache_dir, ...)`` writes (format ``robustact.cache/v2``)::

    cache_dir/meta.json         format, class names, sizes, per-sample ids, skel_min/skel_max,
                                skipped samples (see ``prepare``); written last
    cache_dir/prepare.json      the settings the clips were decoded with (geometry, format)
    cache_dir/clips/NAME.npz    one file per sample: its RGB frames, uint8 (3, T, H, W) as
                                "rgb" (format raw) or JPEG frames (format jpeg), and the
                                unscaled skeleton with its range (what resuming needs)
    cache_dir/skel.npy          float32 (N, C, skel_frames, V, M), already scaled to [0, 1]
    cache_dir/labels.npy        int64   (N,)

Plain ``.npy`` / ``.npz`` files, loaded without pickle. ``ClipDataset`` memory-maps
``skel.npy`` and reads one clip file per item, so a cache far larger than RAM can be
trained on; training and evaluation never decode video again. One file per clip is what
makes ``prepare`` parallel and resumable: each is written whole by one process and renamed
into place. ``robustact.cache/v1`` caches (one ``rgb.npy`` for every clip) are still read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from . import layouts
from .layouts import Layout, Sample, class_names, find_samples, split_member
from .ntu import PROTOCOLS, EmptySkeletonError, resample_skeleton, scale_skeleton

try:
    import fcntl
except ImportError:  # not POSIX: concurrent prepares of one target are not detected
    fcntl = None

CACHE_FORMAT = "robustact.cache/v2"
CACHE_FORMAT_V1 = "robustact.cache/v1"  # one rgb.npy for every clip; still read
META_FILE = "meta.json"
MANIFEST_FILE = "prepare.json"
CLIPS_DIR = "clips"
RGB_FILE = "rgb.npy"  # v1 caches only
SKEL_FILE = "skel.npy"
LABELS_FILE = "labels.npy"
SPLITS = ("train", "test", "all")
# How a cache stores the RGB frames (skeletons are always float32 as they are).
RGB_FORMATS = ("raw", "jpeg")
# Fixed JPEG quantiser (FFmpeg's ``-q:v``; 1 is the finest): 2 keeps every pixel within a
# few levels of the raw value on average (see README, "Preparing at NTU scale").
JPEG_QSCALE = 2
# meta.json keys that describe one run of prepare rather than the cache's content.
RUN_KEYS = ("created", "seconds", "prepare", "root")


class SkippedSampleWarning(UserWarning):
    """``prepare`` left a sample out (no skeleton body, or a modality's file missing)."""


def _present_coords(arr: np.ndarray) -> np.ndarray:
    """(K, C) coordinates of every joint of every body present in a frame of (T, V, C, M)."""
    bodies = np.moveaxis(arr, 3, 1)  # (T, M, V, C)
    present = np.any(bodies != 0, axis=(2, 3))
    return bodies[present].reshape(-1, arr.shape[2])


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
            progress: Callable[[int, int], None] | None = None, *,
            workers: int | None = None, cache_format: str = "raw") -> dict:
    """Decode every sample of the NTU-layout dataset at ``root`` into ``cache_dir``.

    Per sample: the skeleton is parsed (two most active bodies), resampled to
    ``skel_frames`` by linear interpolation and min-max scaled to [0, 1]; the video is
    decoded to ``rgb_frames`` uniformly sampled frames, shorter side resized to
    ``rgb_size`` and centre-cropped (see ``ntu.read_video``).

    ``workers`` processes decode clips side by side (default: the cores this process may
    use; 1 decodes in this process). The cache does not depend on it: byte for byte the
    same arrays. ``cache_format`` is how RGB frames are stored: "raw" (uint8 arrays, the
    default) or "jpeg" (each frame JPEG-encoded, 4:4:4, quantiser ``JPEG_QSCALE``: several
    times smaller on natural video, but lossy, so pixel values differ from "raw" by a few
    levels; see the README before training or evaluating on it).

    Skipped with a ``SkippedSampleWarning`` naming the sample (and listed under
    ``"skipped"`` in the meta): samples whose ``.skeleton`` has no body in any frame, and
    samples whose skeleton or video file is missing (both modalities are needed). A
    malformed ``.skeleton`` raises ``SkeletonFormatError`` (file and line) and an
    undecodable video ``VideoDecodeError``: a corrupt download should be fixed, not hidden.
    With several workers, the error of the earliest such sample among those decoded is
    raised once the clips in flight are done.

    Skeleton scaling constants: ``skel_min`` / ``skel_max`` are the per-axis (x, y, z; x, y)
    minimum and maximum over every joint of every body present in any frame of the
    **X-Sub training split** (before resampling, which cannot leave that range). One pair
    serves both protocols so one cache serves both; the few X-View test clips of X-Sub
    training subjects thus inform 6 numbers, which we accept. If the dataset has no X-Sub
    training subject the constants come from all samples, with a warning, and
    ``skel_range_source`` says so. Values outside the range (test clips) are clipped.

    Resumable, and readers only ever see a complete cache: clips are written into the
    partial cache ``.NAME.partial`` next to ``cache_dir``, each clip file whole under a
    temporary name and renamed into place. Its ``prepare.json`` records the settings
    (geometry, format); ``meta.json`` is written last, and the partial cache is then
    renamed to ``cache_dir`` (replacing an existing cache only then). After a crash or an
    error, running ``prepare`` again with the same settings decodes only the clips not yet
    written (and those whose source files changed since: size and modification time); a run
    with other settings is refused rather than mixing geometries. Re-preparing a complete
    cache with the same settings reuses its clips too (hard links; the old cache stays
    readable until replaced). Two prepares of one target at a time are refused. A non-empty
    ``cache_dir`` that is not a cache is never replaced (FileExistsError).

    ``progress(done, total)`` is called in this process as clips finish; a sample counts
    two steps (skeleton, video), and clips already cached are counted in one call first.
    Returns a summary: the ``meta.json`` content without the per-sample ``"samples"`` list
    (56 880 entries on the real dataset), plus ``"cache_dir"``. ``meta["prepare"]`` says how
    many clips this run decoded and how many it reused.
    """
    started = time.perf_counter()
    for name, value in (("rgb_frames", rgb_frames), ("rgb_size", rgb_size),
                        ("skel_frames", skel_frames)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cache_format not in RGB_FORMATS:
        raise ValueError(f"cache_format must be one of {RGB_FORMATS}, got {cache_format!r}")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = _worker_count(workers)
    root, cache_dir = Path(root), Path(cache_dir)
    _check_target(cache_dir)
    layout = layouts.detect(root)
    names = class_names(root)
    samples = find_samples(root)
    if not samples:
        raise ValueError(f"{root}: no sample found")
    for sample in samples:
        if sample.label >= len(names):
            raise ValueError(f"{sample.name}: action A{sample.label + 1:03d} but the dataset has "
                             f"only {len(names)} class names")
    settings = _settings(rgb_frames, rgb_size, skel_frames, cache_format)
    total = 2 * len(samples)
    done = 0

    def step(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    work = cache_dir.with_name(f".{cache_dir.name}.partial")  # same file system: atomic rename
    lock = _claim(work, settings)
    try:
        clips = work / CLIPS_DIR
        _link_clips_of(cache_dir, clips, settings)
        skipped: dict[int, str] = {}
        jobs = []
        for index, sample in enumerate(samples):
            reason = layouts.missing_reason(layout, sample)
            if reason is not None:
                skipped[index] = reason
                warnings.warn(f"skipping sample {sample.name}: {skipped[index]}",
                              SkippedSampleWarning, stacklevel=2)
                continue
            job = _ClipJob(index, sample.name, layout.name, sample, str(clips / f"{sample.name}.npz"), settings,
                           layouts.source_stamp(sample), threads=1 if workers > 1 else None)
            info = _clip_info(Path(job.path))
            if info is None or info.get("settings") != settings or info.get("source") != job.source:
                jobs.append(job)
        reused = len(samples) - len(skipped) - len(jobs)
        if len(jobs) < len(samples):
            step(2 * (len(samples) - len(jobs)))
        decoded = 0

        def finished(index: int, reason: str | None) -> None:
            nonlocal decoded
            if reason is None:
                decoded += 1
            else:
                skipped[index] = reason
                # stacklevel: finished <- _run_jobs <- prepare <- the caller of prepare
                warnings.warn(f"skipping sample {samples[index].name}: {reason}",
                              SkippedSampleWarning, stacklevel=4)
            step(2)

        _run_jobs(jobs, workers, finished)
        kept = [s for i, s in enumerate(samples) if i not in skipped]
        if not kept:
            raise ValueError(f"{root}: no usable sample ({len(skipped)} skipped)")
        meta = _build_meta(root, work, layout, names, samples, kept, skipped, settings,
                           lambda sample: _clip_arrays(clips / f"{sample.name}.npz"))
        _drop_other_clips(clips, kept)
        meta["bytes_per_clip"] = _bytes_per_clip(sum((clips / f"{s.name}.npz").stat().st_size for s in kept),
                                                 len(kept), settings, layout)
        meta["prepare"] = {"workers": workers, "decoded": decoded, "reused": reused}
        meta["seconds"] = round(time.perf_counter() - started, 3)
        _write_json(work / META_FILE, meta)
        _swap_into_place(work, cache_dir)
    finally:
        os.close(lock)
    summary = {k: v for k, v in meta.items() if k != "samples"}
    summary["cache_dir"] = str(cache_dir)
    return summary


# ------------------------------------------------------------------ prepare in pieces
#
# What a prepare spread over machines (the service's sharded ``prepare`` job) calls: each
# piece decodes some samples into clip files (``decode_samples``) and reports their skeleton
# arrays (``clip_arrays``); one last step writes ``skel.npy``, ``labels.npy`` and the meta
# from those arrays alone (``assemble_cache``), without reading the clips' frames again.
# The clip files and the meta are what ``prepare`` writes for the same samples.


def decode_samples(root: str | os.PathLike, clips_dir: str | os.PathLike, names: list[str], rgb_frames: int,
                   rgb_size: int, skel_frames: int, *, cache_format: str = "raw",
                   workers: int | None = 1) -> dict[str, str | None]:
    """Decode the samples ``names`` of the NTU-layout dataset at ``root`` into
    ``clips_dir/NAME.npz``; returns each name's reason for being skipped (None: decoded).
    Malformed files raise as in ``prepare``."""
    if cache_format not in RGB_FORMATS:
        raise ValueError(f"cache_format must be one of {RGB_FORMATS}, got {cache_format!r}")
    settings = _settings(rgb_frames, rgb_size, skel_frames, cache_format)
    layout = layouts.detect(root)
    by_name = {s.name: s for s in find_samples(root)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{root}: no sample named {missing[0]}")
    clips = Path(clips_dir)
    clips.mkdir(parents=True, exist_ok=True)
    workers = _worker_count(workers)
    reasons: dict[str, str | None] = {}
    jobs = []
    for index, name in enumerate(names):
        sample = by_name[name]
        reason = layouts.missing_reason(layout, sample)
        if reason is not None:
            reasons[name] = reason
            continue
        jobs.append(_ClipJob(index, name, layout.name, sample, str(clips / f"{name}.npz"), settings,
                             layouts.source_stamp(sample), threads=1 if workers > 1 else None))
    _run_jobs(jobs, workers, lambda index, reason: reasons.__setitem__(names[index], reason))
    return {name: reasons[name] for name in names}


def clip_arrays(path: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(info, unscaled skeleton (T, V, 3, M), coords_min, coords_max) of a clip file."""
    return _clip_arrays(Path(path))


def assemble_cache(root: str | os.PathLike, cache_dir: str | os.PathLike, arrays: Callable[[str], tuple],
                   skipped: dict[str, str], clip_bytes: int, rgb_frames: int, rgb_size: int, skel_frames: int,
                   cache_format: str = "raw") -> dict:
    """Write ``skel.npy``, ``labels.npy``, ``prepare.json`` and, last, ``meta.json`` into
    ``cache_dir`` for the samples of ``root`` that are not in ``skipped`` (name → reason),
    from ``arrays(name)`` (what ``clip_arrays`` gives of its clip file). ``clip_bytes``: the
    clip files' total size. Returns the meta."""
    root, work = Path(root), Path(cache_dir)
    work.mkdir(parents=True, exist_ok=True)
    settings = _settings(rgb_frames, rgb_size, skel_frames, cache_format)
    layout = layouts.detect(root)
    names = class_names(root)
    samples = find_samples(root)
    index = {s.name: i for i, s in enumerate(samples)}
    unknown = [n for n in skipped if n not in index]
    if unknown:
        raise ValueError(f"{root}: no sample named {unknown[0]}")
    skipped_at = {index[n]: reason for n, reason in skipped.items()}
    kept = [s for i, s in enumerate(samples) if i not in skipped_at]
    meta = _build_meta(root, work, layout, names, samples, kept, skipped_at, settings,
                       lambda sample: arrays(sample.name))
    meta["bytes_per_clip"] = _bytes_per_clip(clip_bytes, len(kept), settings, layout)
    _write_json(work / MANIFEST_FILE, settings)
    _write_json(work / META_FILE, meta)
    return meta


def _build_meta(root: Path, work: Path, layout: Layout, names: list[str], samples: list, kept: list,
                skipped: dict[int, str], settings: dict, arrays: Callable) -> dict:
    """Write ``skel.npy`` and ``labels.npy`` of the ``kept`` samples into ``work`` and return
    the cache's meta (without the run's ``bytes_per_clip``, ``prepare`` and ``seconds``).
    ``arrays(sample)`` gives a kept sample's (info, unscaled skeleton (T, V, C, M), coords_min,
    coords_max), as its clip file stores them."""
    if not kept:
        raise ValueError(f"{root}: no usable sample ({len(skipped)} skipped)")
    return {
        "format": CACHE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "root": str(Path(root).resolve()),
        "class_names": names,
        "num_classes": len(names),
        "rgb_frames": settings["rgb_frames"],
        "rgb_size": settings["rgb_size"],
        "skel_frames": settings["skel_frames"],
        "layout": layout.name,
        "joints": layout.joints,
        "skel_channels": layout.coords,
        "persons": layout.persons,
        "cache_format": settings["cache_format"],
        **_assemble(work, layout, kept, settings, arrays),
        "skipped": [{"name": samples[i].name, "reason": skipped[i]} for i in sorted(skipped)],
        "splits": {p: {"train": sum(split_member(layout, s.record, p) for s in kept),
                       "test": sum(not split_member(layout, s.record, p) for s in kept)}
                   for p in layout.protocols},
    }


def _clip_arrays(path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as clip:
        return json.loads(clip["info"].tobytes()), clip["skel"], clip["coords_min"], clip["coords_max"]


def _drop_other_clips(clips: Path, kept: list) -> None:
    """Delete every file of ``clips/`` that is not a kept sample's (torn writes, samples
    gone from the root)."""
    wanted = {f"{s.name}.npz" for s in kept}
    for path in clips.iterdir():
        if path.name not in wanted:
            path.unlink()


def _bytes_per_clip(clip_bytes: int, n: int, settings: dict, layout: Layout) -> int:
    """On disk per clip: its clip file, its row of skel.npy and its label."""
    return round(clip_bytes / n) + layout.coords * settings["skel_frames"] * layout.joints * layout.persons * 4 + 8


def _assemble(work: Path, layout: Layout, kept: list, settings: dict, arrays: Callable) -> dict:
    """Write ``skel.npy`` and ``labels.npy`` of the ``kept`` samples (their skeletons from
    ``arrays``, see ``_build_meta``); return the meta entries that depend on the clips."""
    n, skel_frames = len(kept), settings["skel_frames"]
    joints, coords, persons = layout.joints, layout.coords, layout.persons
    # Unscaled skeletons go to a scratch memmap: the scaling constants are only known once
    # every training skeleton has been read.
    scratch = np.lib.format.open_memmap(work / "skel_raw.npy", mode="w+", dtype=np.float32,
                                        shape=(n, skel_frames, joints, coords, persons))
    records = []
    lo_train = np.full(coords, np.inf)
    hi_train = np.full(coords, -np.inf)
    lo_all, hi_all = lo_train.copy(), hi_train.copy()
    for row, sample in enumerate(kept):
        info, skel, lo, hi = arrays(sample)
        scratch[row] = skel
        lo_all, hi_all = np.minimum(lo_all, lo), np.maximum(hi_all, hi)
        if split_member(layout, sample.record, "xsub"):
            lo_train, hi_train = np.minimum(lo_train, lo), np.maximum(hi_train, hi)
        records.append({"name": sample.name, **sample.record, "label": sample.label,
                        "skeleton_frames": info["skeleton_frames"], "bodies": info["bodies"]})
    if np.all(np.isfinite(lo_train)):
        skel_min, skel_max, source = lo_train, hi_train, "xsub-train"
    else:
        warnings.warn(f"{work}: no X-Sub training subject; skeleton scaling constants "
                      "come from all samples", stacklevel=3)
        skel_min, skel_max, source = lo_all, hi_all, "all-samples"
    skel_min = [float(v) for v in skel_min]
    skel_max = [float(v) for v in skel_max]
    skel = np.lib.format.open_memmap(work / SKEL_FILE, mode="w+", dtype=np.float32,
                                     shape=(n, coords, skel_frames, joints, persons))
    for i in range(n):
        # (T, V, C, M) -> the model layout (C, T, V, M)
        skel[i] = scale_skeleton(scratch[i], skel_min, skel_max).transpose(2, 0, 1, 3)
    skel.flush()
    del skel, scratch
    os.remove(work / "skel_raw.npy")
    labels = np.array([s.label for s in kept], dtype=np.int64)
    np.save(work / LABELS_FILE, labels, allow_pickle=False)
    frames, size = settings["rgb_frames"], settings["rgb_size"]
    return {
        "arrays": {
            "rgb": {"dir": CLIPS_DIR, "format": settings["cache_format"], "dtype": "uint8",
                    "layout": "3,T,H,W", "shape": [3, frames, size, size]},
            "skel": {"file": SKEL_FILE, "dtype": "float32", "layout": "N,C,T,V,M",
                     "shape": [n, coords, skel_frames, joints, persons]},
            "labels": {"file": LABELS_FILE, "dtype": "int64", "shape": [n]},
        },
        "skel_min": skel_min,
        "skel_max": skel_max,
        "skel_range_source": source,
        "num_samples": n,
        "samples": records,
    }


# ------------------------------------------------------------------------ clips, workers


@dataclass(frozen=True)
class _ClipJob:
    """One sample to decode into the clip file ``path`` (sent to a decoding process)."""

    index: int
    name: str
    layout: str
    sample: Sample
    path: str
    settings: dict
    source: dict
    threads: int | None = None  # FFmpeg threads (None: FFmpeg's choice)


def _settings(rgb_frames: int, rgb_size: int, skel_frames: int, cache_format: str) -> dict:
    return {"format": CACHE_FORMAT, "rgb_frames": int(rgb_frames), "rgb_size": int(rgb_size),
            "skel_frames": int(skel_frames), "cache_format": cache_format}


def _describe(settings: dict) -> str:
    return (f"rgb_frames={settings.get('rgb_frames')} rgb_size={settings.get('rgb_size')} "
            f"skel_frames={settings.get('skel_frames')} cache_format={settings.get('cache_format')}")


def _worker_count(workers: int | None) -> int:
    if multiprocessing.current_process().daemon:
        return 1  # a daemonic process may not start children (e.g. a DataLoader worker)
    if workers is not None:
        return int(workers)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _claim(work: Path, settings: dict) -> int:
    """Create or reopen the partial cache ``work``, lock it against a second prepare and
    check it was started with the same ``settings``; returns the lock's descriptor."""
    work.mkdir(exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FileExistsError(f"{work}: another prepare is writing this cache") from None
        manifest = work / MANIFEST_FILE
        if manifest.is_file():
            found = json.loads(manifest.read_text(encoding="utf-8"))
            if found != settings:
                raise ValueError(
                    f"{work}: an interrupted prepare decoded clips there with {_describe(found)}; "
                    f"this one asks for {_describe(settings)}. Run it with the earlier settings to "
                    f"resume, or delete {work} to start over (geometries are never mixed)")
        elif any(work.iterdir()):
            raise FileExistsError(f"{work}: holds files but no {MANIFEST_FILE}; refusing to use it")
        else:
            _write_json(manifest, settings)
        (work / CLIPS_DIR).mkdir(exist_ok=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_clips_of(cache_dir: Path, clips: Path, settings: dict) -> None:
    """Hard-link into ``clips`` the clip files of a complete cache at ``cache_dir`` prepared
    with the same settings, so that re-preparing it decodes only new or changed samples."""
    try:
        if (not (cache_dir / META_FILE).is_file()
                or json.loads((cache_dir / MANIFEST_FILE).read_text(encoding="utf-8")) != settings):
            return
    except (OSError, ValueError):
        return
    for path in (cache_dir / CLIPS_DIR).glob("*.npz"):
        target = clips / path.name
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:
                return  # no hard links on this file system: those clips are decoded again


def _write_clip(path: Path, info: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a clip file whole under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clip_info(path: Path) -> dict | None:
    """The ``info`` record of a clip file; None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as clip:
            return json.loads(clip["info"].tobytes())
    except Exception:  # whatever is wrong with the file, the clip is decoded again
        return None


def _prepare_clip(job: _ClipJob) -> tuple[int, str | None]:
    """Decode one sample into its clip file; returns (index, reason it was skipped or None)."""
    s = job.settings
    layout = layouts.by_name(job.layout)
    try:
        raw = layouts.read_skeleton(layout, job.sample)
    except EmptySkeletonError as exc:
        return job.index, f"no skeleton body ({exc.message})"
    rgb = layouts.read_video(layout, job.sample, s["rgb_frames"], s["rgb_size"], threads=job.threads)
    coords = _present_coords(raw)
    info = {"name": job.name, "settings": s, "source": job.source,
            "skeleton_frames": int(raw.shape[0]),
            "bodies": int(np.any(raw != 0, axis=(0, 1, 2)).sum())}
    _write_clip(Path(job.path), info, {
        "skel": resample_skeleton(raw, s["skel_frames"]),  # (T, V, C, M), unscaled
        "coords_min": coords.min(axis=0), "coords_max": coords.max(axis=0),
        **_encode_rgb(rgb, s["cache_format"])})
    return job.index, None


def _init_decoding_process() -> None:
    torch.set_num_threads(1)  # one clip per process: the pool is the parallelism


def _run_jobs(jobs: list[_ClipJob], workers: int,
              finished: Callable[[int, str | None], None]) -> None:
    """Decode ``jobs``, calling ``finished(index, skip_reason)`` here as each clip is done.

    With ``workers`` > 1, in that many processes forked from a fresh server process that
    has only imported this module ("forkserver"; "spawn" where there is none): nothing of
    the caller (torch threads, open connections) is inherited, and after the first pool of
    a process, starting one is instant. At most two clips are queued per process, so that a
    crash or an error loses only the clips in flight. After an error no new clip starts;
    the error of the earliest sample is raised once the clips in flight are done (their
    files are kept for the next run)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finished(*_prepare_clip(job))
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # applies when the server starts
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                               initializer=_init_decoding_process)
    queue = iter(jobs)
    running: dict = {}
    failures: list[tuple[_ClipJob, BaseException]] = []
    try:
        while True:
            while not failures and len(running) < 2 * workers:
                job = next(queue, None)
                if job is None:
                    break
                running[pool.submit(_prepare_clip, job)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                if future.exception() is None:
                    finished(*future.result())
                else:
                    failures.append((job, future.exception()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        job, error = min(failures, key=lambda f: f[0].index)
        lost = [j.name for j, e in failures if isinstance(e, BrokenProcessPool)]
        if lost:
            error.add_note(f"a decoding process died (killed, or out of memory) with these clips in "
                           f"flight: {', '.join(lost)}; the clips finished are kept: run prepare "
                           "again to resume")
        raise error


# ------------------------------------------------------------------------ RGB storage


def _encode_rgb(rgb: np.ndarray, cache_format: str) -> dict[str, np.ndarray]:
    """The arrays a clip file stores for uint8 (3, T, H, W) frames in ``cache_format``."""
    if cache_format == "raw":
        return {"rgb": rgb}
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = rgb.shape[3], rgb.shape[2]
    codec.pix_fmt = "yuvj444p"  # no chroma subsampling: colour edges stay where they were
    codec.time_base = Fraction(1, 25)
    codec.thread_count = 1  # slice threads would change the bit stream
    codec.options = {"qmin": str(JPEG_QSCALE), "qmax": str(JPEG_QSCALE)}
    frames = []
    for t in range(rgb.shape[1]):
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:, t].transpose(1, 2, 0)),
                                             format="rgb24").reformat(format="yuvj444p")
        frames.append(b"".join(bytes(p) for p in codec.encode(picture)))
    if not all(frames):
        raise RuntimeError("the JPEG encoder did not return one picture per frame")
    return {"rgb_jpeg": np.frombuffer(b"".join(frames), dtype=np.uint8),
            "rgb_jpeg_sizes": np.array([len(f) for f in frames], dtype=np.int64)}


def _decode_rgb(clip, cache_format: str) -> np.ndarray:
    """uint8 (3, T, H, W) frames from the arrays of a clip file (see ``_encode_rgb``)."""
    if cache_format == "raw":
        return clip["rgb"]
    data, sizes = clip["rgb_jpeg"], clip["rgb_jpeg_sizes"]
    codec = av.CodecContext.create("mjpeg", "r")
    codec.thread_count = 1
    ends = np.cumsum(sizes)
    frames = [picture.to_ndarray(format="rgb24")
              for start, end in zip(ends - sizes, ends)
              for picture in codec.decode(av.Packet(data[start:end].tobytes()))]
    if len(frames) != len(sizes):
        raise ValueError(f"a clip file holds {len(sizes)} JPEG frames but {len(frames)} decoded")
    return np.ascontiguousarray(np.stack(frames).transpose(3, 0, 1, 2))


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
    if meta.get("format") not in (CACHE_FORMAT, CACHE_FORMAT_V1):
        raise ValueError(f"{path}: cache format {meta.get('format')!r}, expected "
                         f"{CACHE_FORMAT!r}; run prepare again")
    return meta


def cache_digest(cache_dir: str | os.PathLike) -> str:
    """SHA-256 of what a prepared cache holds: ``meta.json`` without the keys that describe
    the run (``RUN_KEYS``), ``skel.npy``, ``labels.npy`` and the RGB arrays of every clip.
    Equal digests mean equal items; prepared twice from the same root, the same settings
    give the same digest whatever the number of workers or interruptions."""
    cache_dir = Path(cache_dir)
    meta = load_meta(cache_dir)
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k not in RUN_KEYS},
                                       sort_keys=True).encode())

    def add(label: str, array: np.ndarray) -> None:
        digest.update(f"{label} {array.dtype.str} {array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())

    arrays = [SKEL_FILE, LABELS_FILE] + ([RGB_FILE] if meta["format"] == CACHE_FORMAT_V1 else [])
    for name in arrays:
        add(name, np.load(cache_dir / name, mmap_mode="r", allow_pickle=False))
    if meta["format"] != CACHE_FORMAT_V1:
        for record in meta["samples"]:
            with np.load(cache_dir / CLIPS_DIR / f"{record['name']}.npz", allow_pickle=False) as clip:
                for key in sorted(set(clip.files) - {"info"}):  # info: where it came from
                    add(f"{record['name']}/{key}", clip[key])
    return digest.hexdigest()


class ClipDataset(Dataset):
    """One split of a prepared cache.

    ``protocol`` is "xsub" or "xview"; ``split`` is "train", "test" or "all" (every
    sample, whatever the protocol). Items are ``(rgb, skel, label)``: rgb float32
    ``(3, T, H, W)`` in [0, 1], skel float32 ``(C, T, V, M)`` in [0, 1] (absent bodies 0),
    label int. (C, V, M: the layout's, see the module docstring.)

    Attributes: ``meta`` (the cache's meta.json), ``class_names``, ``num_classes``,
    ``indices`` (int64 rows of the cache in this split), ``labels`` (int64, per item),
    ``sample_names``, ``skel_min`` / ``skel_max`` (C floats each; store them with a model
    so uploads are scaled the same way).

    ``skel.npy`` is memory-mapped lazily in each process (a DataLoader worker opens its
    own) and each item reads its clip file, so the dataset is safe to use from DataLoader
    worker processes; a ``jpeg`` cache decodes the item's frames there.

    ``normalisation`` (``{"skel_min", "skel_max"}``, a checkpoint's): scale skeletons with
    these constants instead of the cache's, so a model sees clips of another cache exactly
    as it saw its training cache, and ε_S keeps its physical size. From a v2 cache the
    unscaled skeleton of each clip file is scaled afresh (identical to a cache prepared
    with those constants); a v1 cache has only the scaled array, which is mapped back and
    rescaled (coordinates the cache clipped stay at its bounds). ``skel_min`` /
    ``skel_max`` are then these constants.
    """

    def __init__(self, cache_dir: str | os.PathLike, protocol: str = "xsub",
                 split: str = "train", normalisation: dict | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cache_dir = Path(cache_dir)
        self.meta = load_meta(self.cache_dir)
        self.layout = layouts.of_meta(self.meta)
        if protocol not in self.layout.protocols:
            raise ValueError(f"{self.cache_dir}: an {self.layout.name}-layout cache has the protocol(s) "
                             f"{', '.join(self.layout.protocols)}, not {protocol!r}")
        self.protocol, self.split = protocol, split
        samples = self.meta["samples"]
        all_labels = np.load(self.cache_dir / LABELS_FILE, allow_pickle=False)
        if all_labels.shape != (len(samples),):
            raise ValueError(f"{self.cache_dir}: {LABELS_FILE} does not match {META_FILE}")
        if split == "all":
            rows = range(len(samples))
        else:
            want = split == "train"
            rows = [i for i, s in enumerate(samples) if split_member(self.layout, s, protocol) == want]
        self.indices = np.asarray(list(rows), dtype=np.int64)
        if self.indices.size == 0:
            raise ValueError(f"{self.cache_dir}: the {protocol}/{split} split is empty")
        self.labels = all_labels[self.indices].astype(np.int64)
        self._rgb = self._skel = None
        self._norm = None  # (skel_min, skel_max) to rescale to, when not the cache's own
        if normalisation is not None:
            lo = tuple(float(v) for v in normalisation["skel_min"])
            hi = tuple(float(v) for v in normalisation["skel_max"])
            coords = self.layout.coords
            if len(lo) != coords or len(hi) != coords:
                raise ValueError(f"the normalisation holds {len(lo)} skel_min and {len(hi)} skel_max values but this "
                                 f"{self.layout.name}-layout cache has {coords} coordinates per joint "
                                 f"({'x, y, z' if coords == 3 else 'x, y'}): the model was trained on another layout")
            cache = (tuple(float(v) for v in self.meta["skel_min"]), tuple(float(v) for v in self.meta["skel_max"]))
            if (lo, hi) != cache:
                self._norm = (lo, hi)

    # -- metadata ---------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def skel_min(self) -> tuple[float, ...]:
        """The constants the items' skeletons are scaled with (the cache's, or the
        ``normalisation`` given)."""
        return self._norm[0] if self._norm else tuple(float(v) for v in self.meta["skel_min"])

    @property
    def skel_max(self) -> tuple[float, ...]:
        return self._norm[1] if self._norm else tuple(float(v) for v in self.meta["skel_max"])

    @property
    def sample_names(self) -> list[str]:
        return [self.meta["samples"][i]["name"] for i in self.indices]

    # -- data -------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._skel is None:
            self._skel = np.load(self.cache_dir / SKEL_FILE, mmap_mode="r", allow_pickle=False)
            if self.meta["format"] == CACHE_FORMAT_V1:  # one array for every clip
                self._rgb = np.load(self.cache_dir / RGB_FILE, mmap_mode="r", allow_pickle=False)

    def _rgb_clip(self, row: int) -> np.ndarray:
        """uint8 (3, T, H, W) frames of the cache's row ``row``."""
        if self._rgb is not None:
            return self._rgb[row]
        path = self.cache_dir / CLIPS_DIR / f"{self.meta['samples'][row]['name']}.npz"
        with np.load(path, allow_pickle=False) as clip:
            return _decode_rgb(clip, self.meta["cache_format"])

    def __len__(self) -> int:
        return int(self.indices.size)

    def _rescaled_skeleton(self, row: int) -> np.ndarray:
        """float32 (C, T, V, M) of row ``row`` scaled with ``normalisation``."""
        lo, hi = self._norm
        if self._rgb is None:  # v2: the clip file keeps the unscaled skeleton
            path = self.cache_dir / CLIPS_DIR / f"{self.meta['samples'][row]['name']}.npz"
            with np.load(path, allow_pickle=False) as clip:
                raw = clip["skel"]
            return scale_skeleton(raw, lo, hi).transpose(2, 0, 1, 3)
        scaled = np.asarray(self._skel[row], dtype=np.float32)  # (C, T, V, M), cache constants
        present = np.any(scaled != 0, axis=(0, 2))  # (T, M)
        c = scaled.shape[0]
        c_lo = np.asarray(self.meta["skel_min"], dtype=np.float32).reshape(c, 1, 1, 1)
        c_hi = np.asarray(self.meta["skel_max"], dtype=np.float32).reshape(c, 1, 1, 1)
        raw = scaled * np.maximum(c_hi - c_lo, np.float32(1e-6)) + c_lo
        n_lo = np.asarray(lo, dtype=np.float32).reshape(c, 1, 1, 1)
        n_hi = np.asarray(hi, dtype=np.float32).reshape(c, 1, 1, 1)
        out = np.clip((raw - n_lo) / np.maximum(n_hi - n_lo, np.float32(1e-6)), 0.0, 1.0).astype(np.float32)
        return out * present[None, :, None, :]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        self._open()
        row = int(self.indices[i])
        rgb = torch.from_numpy(np.asarray(self._rgb_clip(row), dtype=np.float32)).div_(255.0)
        if self._norm is not None:
            skel = torch.from_numpy(np.ascontiguousarray(self._rescaled_skeleton(row)))
        else:
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


def load_split(cache_dir: str | os.PathLike, protocol: str, split: str, max_samples: int | None = None,
               seed: int = 0) -> "ClipDataset":
    """The clips of ``split`` under ``protocol``, or a class-balanced subset of
    ``max_samples`` of them (``ClipDataset.subset``). Module level, so that
    ``functools.partial(load_split, ...)`` pickles (data-parallel ranks build their own)."""
    data = ClipDataset(cache_dir, protocol=protocol, split=split)
    return data.subset(max_samples, seed=seed) if max_samples else data
