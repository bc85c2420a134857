"""`data prepare` at scale: 1 vs 2 decoding processes, and what each cache format costs.

Synthesises ``--base-clips`` distinct samples (``--video-size``, ``--frames``) and gives each
file further sample names (other replication numbers, hard links) up to ``--clips``
samples: rendering a synthetic clip costs ~10x decoding it, and what is measured here is
the decoding. Then, side by side in this run:

* ``prepare`` of that set at the tiny preset with 1 worker, then with 2 (fresh targets):
  times, ``prepare_speedup`` (1-worker time / 2-worker time; target >= 1.7 on 2 cores; the
  2-worker time includes starting the processes) and ``caches_equal`` (``cache_digest``:
  every array of every clip, skel.npy, labels.npy, meta);
* the same set in the ``jpeg`` format at the tiny preset, and the first ``--paper-clips``
  samples in both formats at the paper geometry (64 x 224 x 224 RGB, 32 skeleton frames);
* bytes per clip on disk per format per preset, **measured** (``meta["bytes_per_clip"]``:
  the clip file, its row of skel.npy, its label), and for raw also **computed** from the
  geometry (uint8 RGB + the float32 skeleton twice: unscaled in the clip file, scaled in
  skel.npy) as a check; the NTU RGB+D 60 total follows (56,578 usable clips);
* ``ClipDataset.__getitem__`` time per clip per format (one process, 1 torch thread, warm
  page cache), at the paper geometry (``load_ms_per_clip``) and the tiny one.

Synthetic frames (flat-shaded stick figures on smooth backgrounds) compress far better
than real video: the jpeg figures here are a lower bound on its size. ``--photo PATH`` adds
one sample whose video is a natural photograph (any JPEG/PNG) panning slowly with sensor
noise, prepared at the paper geometry in both formats, for a figure closer to real frames.

Last line: one JSON object.

Usage: ``python bench/prepare_scaling.py [--clips 64] [--base-clips 8] [--video-size 640x480]
[--frames 64] [--paper-clips 8] [--photo PATH] [--work DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import av
import numpy as np
import torch

from robustact.models.config import PRESETS
from robustact.models.data.cache import ClipDataset, SkippedSampleWarning, cache_digest, prepare
from robustact.models.data.ntu import RGB_DIR, SKELETON_DIR, SKELETON_SUFFIX, VIDEO_SUFFIX, find_samples
from robustact.models.data.synth import synthesize

NTU60_USABLE_CLIPS = 56_880 - 302  # samples without a skeleton are skipped
FORMATS = ("raw", "jpeg")


def build_root(root: Path, clips: int, base_clips: int, video_size: tuple[int, int], frames: int) -> None:
    """``base_clips`` synthetic samples, each linked under new replication numbers up to
    ``clips`` samples in total."""
    classes = max(2, min(12, base_clips // 2))
    subjects = (1, 3)  # one X-Sub training subject (skeleton range) and one test subject
    synthesize(root, num_classes=classes, subjects=subjects, cameras=(1,), replications=(1,), frames=frames,
               video_size=video_size, seed=0)
    base = find_samples(root)[:base_clips]
    copy = 0
    while len(base) + copy < clips:
        sample = base[copy % len(base)]
        sid = sample.id
        name = (f"S{sid.setup:03d}C{sid.camera:03d}P{sid.performer:03d}"
                f"R{copy // len(base) + 2:03d}A{sid.action:03d}")
        for src, dst in ((sample.skeleton, root / SKELETON_DIR / f"{name}{SKELETON_SUFFIX}"),
                         (sample.video, root / RGB_DIR / f"{name}{VIDEO_SUFFIX}")):
            os.link(src, dst)
        copy += 1
    for extra in find_samples(root)[clips:]:  # synthesize wrote more than asked for
        extra.skeleton.unlink()
        extra.video.unlink()


def add_photo_sample(root: Path, photo: Path, frames: int, video_size: tuple[int, int]) -> str:
    """A sample whose video pans slowly over a natural photograph (sensor noise added)."""
    with av.open(str(photo)) as container:
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")
    width, height = video_size
    scale = 1.15 * max(width / image.shape[1], height / image.shape[0])
    big = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
        width=round(image.shape[1] * scale) // 2 * 2, height=round(image.shape[0] * scale) // 2 * 2).to_ndarray()
    rng = np.random.default_rng(0)
    donor = find_samples(root)[0]
    name = "S001C001P001R099A001"
    path = root / RGB_DIR / f"{name}{VIDEO_SUFFIX}"
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = width * height * 30 * 2
        for t in range(frames):
            dx = round((big.shape[1] - width) * t / max(1, frames - 1))
            dy = round((big.shape[0] - height) * 0.5 * (1 + np.sin(t / 9)))
            frame = big[dy:dy + height, dx:dx + width].astype(np.float32) + rng.normal(0, 3, (height, width, 3))
            picture = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    os.link(donor.skeleton, root / SKELETON_DIR / f"{name}{SKELETON_SUFFIX}")
    return name


def timed_prepare(root: Path, out: Path, preset: dict, **kwargs) -> tuple[float, dict]:
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        summary = prepare(root, out, rgb_frames=preset["rgb_frames"], rgb_size=preset["rgb_size"],
                          skel_frames=preset["skel_frames"], **kwargs)
    return time.perf_counter() - t, summary


def load_ms(cache: Path, min_seconds: float = 0.5) -> float:
    """Mean ``ClipDataset.__getitem__`` time over every clip (repeated to ``min_seconds``)."""
    ds = ClipDataset(cache, split="all")
    ds[0]  # open skel.npy
    loads, t = 0, time.perf_counter()
    while loads == 0 or time.perf_counter() - t < min_seconds:
        for i in range(len(ds)):
            ds[i]
        loads += len(ds)
    return 1e3 * (time.perf_counter() - t) / loads


def computed_raw_bytes(preset: dict) -> int:
    skeleton = 3 * preset["skel_frames"] * 25 * 2 * 4
    return 3 * preset["rgb_frames"] * preset["rgb_size"] ** 2 + 2 * skeleton + 8


def subset_root(root: Path, out: Path, names: list[str]) -> Path:
    for sub in (SKELETON_DIR, RGB_DIR):
        (out / sub).mkdir(parents=True)
    (out / "classes.txt").write_bytes((root / "classes.txt").read_bytes())
    for name in names:
        os.link(root / SKELETON_DIR / f"{name}{SKELETON_SUFFIX}", out / SKELETON_DIR / f"{name}{SKELETON_SUFFIX}")
        os.link(root / RGB_DIR / f"{name}{VIDEO_SUFFIX}", out / RGB_DIR / f"{name}{VIDEO_SUFFIX}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=256, help="samples prepared (distinct names)")
    parser.add_argument("--base-clips", type=int, default=8, help="distinct synthetic samples rendered")
    parser.add_argument("--video-size", default="640x480", help="WIDTHxHEIGHT of the synthetic videos")
    parser.add_argument("--frames", type=int, default=64, help="frames per synthetic video")
    parser.add_argument("--paper-clips", type=int, default=8, help="samples prepared at the paper geometry")
    parser.add_argument("--photo", type=Path, default=None, help="a natural photograph for one realistic clip")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    video_size = tuple(int(v) for v in args.video_size.lower().split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="robustact-prepare-"))
    tiny, paper = PRESETS["tiny"], PRESETS["paper"]

    t = time.perf_counter()
    root = work / "root"
    build_root(root, args.clips, min(args.base_clips, args.clips), video_size, args.frames)
    names = [s.name for s in find_samples(root)]
    print(f"synthetic set: {len(names)} samples ({args.base_clips} rendered) of {video_size[0]}x{video_size[1]}, "
          f"{args.frames} frames, in {time.perf_counter() - t:.0f}s ({work})", flush=True)

    seconds = {}
    for workers in (1, 2):
        seconds[workers], summary = timed_prepare(root, work / f"tiny-raw-{workers}w", tiny, workers=workers)
        print(f"prepare tiny raw, {workers} worker(s): {seconds[workers]:.2f}s "
              f"({1e3 * seconds[workers] / len(names):.0f} ms per clip)", flush=True)
    speedup = seconds[1] / seconds[2]
    equal = cache_digest(work / "tiny-raw-1w") == cache_digest(work / "tiny-raw-2w")
    print(f"prepare_speedup {speedup:.2f} (target >= 1.7); caches equal: {equal}", flush=True)

    caches = {("raw", "tiny"): work / "tiny-raw-2w"}
    elapsed, _ = timed_prepare(root, work / "tiny-jpeg", tiny, workers=2, cache_format="jpeg")
    caches[("jpeg", "tiny")] = work / "tiny-jpeg"
    print(f"prepare tiny jpeg, 2 workers: {elapsed:.2f}s", flush=True)
    paper_root = subset_root(root, work / "paper-root", names[:args.paper_clips])
    for fmt in FORMATS:
        elapsed, _ = timed_prepare(paper_root, work / f"paper-{fmt}", paper, workers=2, cache_format=fmt)
        caches[(fmt, "paper")] = work / f"paper-{fmt}"
        print(f"prepare paper geometry {fmt}, {min(args.paper_clips, len(names))} clips, 2 workers: {elapsed:.2f}s",
              flush=True)

    torch.set_num_threads(1)
    bytes_per_clip = {fmt: {} for fmt in FORMATS}
    load = {fmt: {} for fmt in FORMATS}
    for (fmt, preset), cache in caches.items():
        meta = json.loads((cache / "meta.json").read_text())
        bytes_per_clip[fmt][preset] = meta["bytes_per_clip"]
        load[fmt][preset] = round(load_ms(cache), 3)
    computed = {"tiny": computed_raw_bytes(tiny), "paper": computed_raw_bytes(paper)}
    for fmt in FORMATS:
        for preset in ("tiny", "paper"):
            extra = f" (computed from the geometry: {computed[preset]:,})" if fmt == "raw" else ""
            print(f"bytes per clip, {fmt}, {preset}: {bytes_per_clip[fmt][preset]:,} measured{extra}; "
                  f"load {load[fmt][preset]:.2f} ms per clip", flush=True)
    ntu_gb = {fmt: round(bytes_per_clip[fmt]["paper"] * NTU60_USABLE_CLIPS / 1e9, 1) for fmt in FORMATS}
    print("NTU RGB+D 60 at the paper geometry (from the synthetic clips): "
          + ", ".join(f"{fmt} {gb} GB" for fmt, gb in ntu_gb.items()), flush=True)

    result = {
        "clips": len(names), "rendered_clips": args.base_clips, "video_size": list(video_size), "frames": args.frames,
        "paper_clips": min(args.paper_clips, len(names)), "cores": os.cpu_count(),
        "prepare_seconds": {"1": round(seconds[1], 2), "2": round(seconds[2], 2)},
        "prepare_speedup": round(speedup, 2),
        "caches_equal": equal,
        "bytes_per_clip": bytes_per_clip,
        "bytes_per_clip_computed": {"raw": computed},
        "load_ms_per_clip": {fmt: load[fmt]["paper"] for fmt in FORMATS},
        "load_ms_per_clip_tiny": {fmt: load[fmt]["tiny"] for fmt in FORMATS},
        "ntu60_gb_synthetic": ntu_gb,
    }
    if args.photo is not None:
        photo_root = work / "photo-root"
        name = add_photo_sample(subset_root(root, photo_root, names[:1]), args.photo, args.frames, video_size)
        photo = {}
        for fmt in FORMATS:
            timed_prepare(photo_root, work / f"photo-{fmt}", paper, workers=1, cache_format=fmt)
            size = (work / f"photo-{fmt}" / "clips" / f"{name}.npz").stat().st_size
            photo[fmt] = {"clip_file_bytes": size, "load_ms": round(load_ms(work / f"photo-{fmt}"), 2)}
        ratio = photo["raw"]["clip_file_bytes"] / photo["jpeg"]["clip_file_bytes"]
        raw_ds, jpeg_ds = (ClipDataset(work / f"photo-{fmt}", split="all") for fmt in FORMATS)
        row = raw_ds.sample_names.index(name)
        error = (raw_ds[row][0] - jpeg_ds[row][0]).abs().mul(255)
        photo["jpeg"]["max_abs_error"] = round(float(error.max()), 1)
        photo["jpeg"]["mean_abs_error"] = round(float(error.mean()), 2)
        photo["raw_over_jpeg"] = round(ratio, 2)
        photo["ntu60_gb_jpeg"] = round(photo["jpeg"]["clip_file_bytes"] * NTU60_USABLE_CLIPS / 1e9, 1)
        print(f"photo clip at the paper geometry: raw {photo['raw']['clip_file_bytes']:,} B, jpeg "
              f"{photo['jpeg']['clip_file_bytes']:,} B ({ratio:.1f}x smaller; error max "
              f"{photo['jpeg']['max_abs_error']}, mean {photo['jpeg']['mean_abs_error']} levels of 255); load "
              f"{photo['raw']['load_ms']} vs {photo['jpeg']['load_ms']} ms", flush=True)
        result["photo"] = photo
    print(json.dumps(result))


if __name__ == "__main__":
    main()
