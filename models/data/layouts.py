"""The two on-disk dataset layouts robustact prepares, behind one interface.

* ``ntu``: the NTU RGB+D release (``models.data.ntu``): one ``.skeleton`` file and one
  ``_rgb.avi`` per sample, 25 joints × 3-D coordinates × 2 bodies, protocols X-Sub and
  X-View.
* ``imigue``: iMiGUE-style data (``models.data.imigue``): labelled frame ranges of long
  videos, OpenPose JSON per frame, 22 joints × 2-D coordinates × 1 body, protocol X-Sub from
  ``split.json``.

A root is ``imigue`` when it holds ``labels.csv``, else ``ntu`` (``detect``). ``prepare``
records the layout, the joint count, the coordinates and the bodies in the cache's meta,
and each sample's split membership in its record, so that reading a cache never needs the
dataset root (``split_member``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import imigue, ntu, openpose

LAYOUTS = ("ntu", "imigue")


@dataclass(frozen=True)
class Sample:
    """One sample of a dataset root, picklable (it crosses to decoding processes).

    ``skeleton`` / ``video`` are None when the file is missing; ``window`` is the
    (first, last) frame range of a clip cut from a longer video (iMiGUE-style) or None;
    ``record`` holds the fields the cache's meta keeps for it."""

    name: str
    label: int
    skeleton: Path | None
    video: Path | None
    record: dict = field(hash=False, compare=False, default_factory=dict)
    window: tuple[int, int] | None = None


@dataclass(frozen=True)
class Layout:
    name: str
    joints: int
    coords: int
    persons: int
    protocols: tuple[str, ...]
    video_suffix: str

    def geometry(self) -> dict:
        return {"joints": self.joints, "skel_channels": self.coords, "persons": self.persons}


NTU = Layout("ntu", ntu.JOINTS, 3, ntu.BODIES, ntu.PROTOCOLS, ntu.VIDEO_SUFFIX)
IMIGUE = Layout("imigue", openpose.JOINTS, openpose.COORDS, 1, ("xsub",), ".mp4")


def detect(root: str | os.PathLike) -> Layout:
    return IMIGUE if (Path(root) / imigue.LABELS_FILE).is_file() else NTU


def by_name(name: str) -> Layout:
    for layout in (NTU, IMIGUE):
        if layout.name == name:
            return layout
    raise ValueError(f"layout must be one of {LAYOUTS}, got {name!r}")


def of_meta(meta: dict) -> Layout:
    """The layout of a prepared cache (caches from before layouts are ``ntu``)."""
    return by_name(meta.get("layout", "ntu"))


def cache_geometry(meta: dict) -> dict:
    """``joints``, ``skel_channels`` and ``persons`` of a cache, as ``ModelConfig`` takes them."""
    return of_meta(meta).geometry()


def class_names(root: str | os.PathLike) -> list[str]:
    return imigue.class_names(root) if detect(root) is IMIGUE else ntu.class_names(root)


def find_samples(root: str | os.PathLike) -> list[Sample]:
    """Every sample of ``root`` in a fixed order (NTU: by name; iMiGUE-style: labels.csv order)."""
    if detect(root) is IMIGUE:
        train, _ = imigue.read_split(root)
        out = []
        for clip in imigue.find_clips(root):
            skeleton = clip.skeleton_dir if clip.skeleton_dir.is_dir() else None
            video = clip.video if clip.video.is_file() else None
            record = {"video_id": clip.video_id, "start_frame": clip.start, "end_frame": clip.end,
                      "subject": clip.subject, "xsub_train": clip.subject in train}
            out.append(Sample(clip.name, clip.label, skeleton, video, record, (clip.start, clip.end)))
        return out
    out = []
    for s in ntu.find_samples(root):
        sid = s.id
        record = {"setup": sid.setup, "camera": sid.camera, "performer": sid.performer,
                  "replication": sid.replication, "action": sid.action}
        out.append(Sample(s.name, sid.label, s.skeleton, s.video, record))
    return out


def split_member(layout: Layout, record: dict, protocol: str) -> bool:
    """True if a cache record (``meta["samples"][i]``) is in ``protocol``'s training split."""
    if protocol not in layout.protocols:
        raise ValueError(f"an {layout.name}-layout dataset has the protocol(s) {', '.join(layout.protocols)}, "
                         f"not {protocol!r}")
    if layout is IMIGUE:
        return bool(record["xsub_train"])
    return ntu.in_train_split(ntu.SampleId(record["setup"], record["camera"], record["performer"],
                                           record["replication"], record["action"]), protocol)


def read_skeleton(layout: Layout, sample: Sample) -> np.ndarray:
    """float32 ``(T, V, C, M)``, unscaled (metres for NTU, pixels for OpenPose)."""
    if layout is IMIGUE:
        first, last = sample.window
        return openpose.read_openpose_dir(sample.skeleton, first, last)
    return ntu.read_skeleton_file(sample.skeleton)


def read_video(layout: Layout, sample: Sample, frames: int, size: int, threads: int | None = None) -> np.ndarray:
    if sample.window is not None:
        return ntu.read_video_window(sample.video, *sample.window, frames, size, threads=threads)
    return ntu.read_video(sample.video, frames, size, threads=threads)


def missing_reason(layout: Layout, sample: Sample) -> str | None:
    """Why ``sample`` cannot be prepared (a modality's file is missing), or None."""
    if sample.skeleton is None:
        return "no OpenPose directory" if layout is IMIGUE else "no .skeleton file"
    if sample.video is None:
        return f"no {layout.video_suffix} file"
    return None


def source_stamp(sample: Sample) -> dict:
    """Size and modification time of a sample's files (a changed file is decoded again);
    an OpenPose directory counts by its own stamp plus its window."""
    out = {kind: [st.st_size, st.st_mtime_ns]
           for kind, st in (("skeleton", os.stat(sample.skeleton)), ("video", os.stat(sample.video)))}
    if sample.window is not None:
        out["window"] = list(sample.window)
    return out
