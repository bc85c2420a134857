"""NTU RGB+D 60 reader: sample names, the ``.skeleton`` text format, splits and video decode.

On-disk layout of the real release (DESIGN.md section 4)::

    ROOT/nturgb+d_skeletons/SsssCcccPpppRrrrAaaa.skeleton
    ROOT/nturgb+d_rgb/SsssCcccPpppRrrrAaaa_rgb.avi
    ROOT/classes.txt                      (optional; one class name per line)

A ``.skeleton`` file is whitespace-separated text, one record per line::

    frameCount
    then per frame:
        bodyCount                         (may be 0)
        then per body:
            bodyID clipedEdges handLeftConfidence handLeftState handRightConfidence
                handRightState isRestricted leanX leanY trackingState      (10 fields)
            jointCount                    (25)
            25 x: x y z depthX depthY colorX colorY orientationW orientationX
                  orientationY orientationZ trackingState                  (12 fields)

The parser is strict: a line with the wrong number of fields, a token that is not a
number, a joint count other than 25 or a truncated file raises ``SkeletonFormatError``
with the file name and the 1-based line number, so a corrupt download is found at
``prepare`` time rather than silently training on zeros.

Skeleton arrays returned here have the layout ``(frames, V=25, 3, M=2)`` (time first, which
is what the interpolation and the per-frame presence test want); the cache transposes them
to the model layout ``(3, T, V, M)``.
"""

from __future__ import annotations

import io
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

JOINTS = 25
BODIES = 2  # bodies kept per sample (M)
SKELETON_DIR = "nturgb+d_skeletons"
RGB_DIR = "nturgb+d_rgb"
CLASSES_FILE = "classes.txt"
SKELETON_SUFFIX = ".skeleton"
VIDEO_SUFFIX = "_rgb.avi"

JOINT_NAMES = (
    "SpineBase", "SpineMid", "Neck", "Head",
    "ShoulderLeft", "ElbowLeft", "WristLeft", "HandLeft",
    "ShoulderRight", "ElbowRight", "WristRight", "HandRight",
    "HipLeft", "KneeLeft", "AnkleLeft", "FootLeft",
    "HipRight", "KneeRight", "AnkleRight", "FootRight",
    "SpineShoulder", "HandTipLeft", "ThumbLeft", "HandTipRight", "ThumbRight",
)

# Kinect v2 bones as (child, parent) pairs over the 25 joints; used to draw stick figures.
BONES = (
    (1, 0), (20, 1), (2, 20), (3, 2),
    (4, 20), (5, 4), (6, 5), (7, 6), (21, 7), (22, 6),
    (8, 20), (9, 8), (10, 9), (11, 10), (23, 11), (24, 10),
    (12, 0), (13, 12), (14, 13), (15, 14),
    (16, 0), (17, 16), (18, 17), (19, 18),
)

# The 60 official action names, A001 .. A060 (label = A - 1).
NTU60_CLASSES = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop",
    "pickup", "throw", "sitting down", "standing up (from sitting position)", "clapping",
    "reading", "writing", "tear up paper", "wear jacket", "take off jacket",
    "wear a shoe", "take off a shoe", "wear on glasses", "take off glasses",
    "put on a hat/cap",
    "take off a hat/cap", "cheer up", "hand waving", "kicking something",
    "reach into pocket",
    "hopping (one foot jumping)", "jump up", "make a phone call/answer phone",
    "playing with phone/tablet", "typing on a keyboard",
    "pointing to something with finger", "taking a selfie", "check time (from watch)",
    "rub two hands together", "nod head/bow",
    "shake head", "wipe face", "salute", "put the palms together",
    "cross hands in front (say stop)",
    "sneeze/cough", "staggering", "falling", "touch head (headache)",
    "touch chest (stomachache/heart pain)",
    "touch back (backache)", "touch neck (neckache)", "nausea or vomiting condition",
    "use a fan (with hand or paper)/feeling warm", "punching/slapping other person",
    "kicking other person", "pushing other person", "pat on back of other person",
    "point finger at the other person", "hugging other person",
    "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
)

# Official evaluation protocols (Shahroudy et al., CVPR 2016).
XSUB_TRAIN_SUBJECTS = (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
XVIEW_TRAIN_CAMERAS = (2, 3)
PROTOCOLS = ("xsub", "xview")


# --------------------------------------------------------------------------- errors


class SkeletonFormatError(ValueError):
    """A ``.skeleton`` file does not follow the format. ``str()`` names file and line.

    Attributes: ``path`` (the file or upload name), ``line_no`` (1-based, or None when the
    problem is not tied to one line) and ``message``.
    """

    def __init__(self, path, line_no: int | None, message: str):
        self.path = str(path)
        self.line_no = line_no
        self.message = message
        where = f"{self.path}: line {line_no}" if line_no is not None else self.path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep the three-argument constructor picklable (worker → parent)
        return (type(self), (self.path, self.line_no, self.message))


class EmptySkeletonError(SkeletonFormatError):
    """A well-formed ``.skeleton`` file in which no body appears in any frame.

    302 samples of NTU RGB+D 60 are like this; ``prepare`` skips them with a warning.
    """


class VideoDecodeError(ValueError):
    """A video cannot be opened or decoded, or holds no frame. ``str()`` names the file."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message))


class VideoTooLargeError(VideoDecodeError):
    """A video above a limit given to ``read_video``: its resolution, frame count or
    duration. Found from the header before any frame is decoded, or while decoding when
    the header understates the length. The message names the limit."""


# --------------------------------------------------------------------------- sample names

_NAME_RE = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")


@dataclass(frozen=True, order=True)
class SampleId:
    """The five numbers encoded in an NTU sample name ``SsssCcccPpppRrrrAaaa``."""

    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @property
    def label(self) -> int:
        """0-based class index (action A001 is label 0)."""
        return self.action - 1

    @property
    def subject(self) -> int:
        """Alias of ``performer`` (the X-Sub protocol splits on it)."""
        return self.performer

    @property
    def name(self) -> str:
        return (f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}"
                f"R{self.replication:03d}A{self.action:03d}")

    def __str__(self) -> str:
        return self.name


def parse_sample_name(name: str | os.PathLike) -> SampleId:
    """Parse ``SsssCcccPpppRrrrAaaa`` with an optional ``_rgb`` suffix and/or extension.

    Accepts a bare name, a file name (``S001C002P003R002A013.skeleton``,
    ``S001C002P003R002A013_rgb.avi``) or a path to one. Every number must be >= 1.
    Raises ValueError naming the input otherwise.
    """
    stem = os.path.basename(os.fspath(name))
    # Strip one extension, then the RGB suffix: "X_rgb.avi" -> "X_rgb" -> "X".
    if "." in stem:
        stem = stem[: stem.index(".")]
    if stem.endswith("_rgb"):
        stem = stem[: -len("_rgb")]
    match = _NAME_RE.fullmatch(stem)
    if match is None:
        raise ValueError(
            f"{name!s}: not an NTU sample name; expected SsssCcccPpppRrrrAaaa "
            "(e.g. S001C002P003R002A013), optionally with '_rgb' and an extension")
    numbers = [int(g) for g in match.groups()]
    for field_name, value in zip(("setup", "camera", "performer", "replication", "action"),
                                 numbers):
        if value < 1:
            raise ValueError(f"{name!s}: {field_name} number must be >= 1, got {value}")
    return SampleId(*numbers)


def in_train_split(sample_id: SampleId, protocol: str) -> bool:
    """True if the sample belongs to the training split of ``protocol`` ("xsub" | "xview").

    X-Sub trains on the 20 subjects of ``XSUB_TRAIN_SUBJECTS``; X-View on cameras 2 and 3.
    """
    if protocol == "xsub":
        return sample_id.performer in XSUB_TRAIN_SUBJECTS
    if protocol == "xview":
        return sample_id.camera in XVIEW_TRAIN_CAMERAS
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


# --------------------------------------------------------------------------- .skeleton


class _Lines:
    """Line cursor that reports 1-based line numbers in its errors."""

    def __init__(self, text: str, source: str):
        self.lines = text.splitlines()
        self.pos = 0
        self.source = source

    def error(self, message: str, line_no: int | None = None) -> SkeletonFormatError:
        return SkeletonFormatError(self.source, line_no if line_no is not None else self.pos,
                                   message)

    def fields(self, count: int, what: str) -> tuple[list[str], int]:
        """Next line split into exactly ``count`` tokens; returns (tokens, line number)."""
        if self.pos >= len(self.lines):
            raise SkeletonFormatError(self.source, len(self.lines) + 1,
                                      f"unexpected end of file, expected {what}")
        line = self.lines[self.pos]
        self.pos += 1
        tokens = line.split()
        if len(tokens) != count:
            raise self.error(f"expected {what} ({count} field{'s' if count > 1 else ''}), "
                             f"found {len(tokens)} field(s): {line.strip()[:80]!r}")
        return tokens, self.pos

    def count(self, what: str) -> int:
        """Next line as a single non-negative integer."""
        (token,), _ = self.fields(1, what)
        try:
            value = int(token)
        except ValueError:
            raise self.error(f"{what} must be an integer, got {token!r}") from None
        if value < 0:
            raise self.error(f"{what} must be >= 0, got {value}")
        return value


def _numbers(tokens: Sequence[str], lines: _Lines, what: str) -> list[float]:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise lines.error(f"{what}: {bad!r} is not a number") from None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _declared_frame_count(text: str) -> int | None:
    """The frame count on the first line, read from a short prefix of ``text``; None when
    that line is not a single integer (the full parser then reports it)."""
    head = text[:64].splitlines()
    tokens = head[0].split() if head else []
    if len(tokens) == 1 and tokens[0].isascii() and tokens[0].isdigit():
        return int(tokens[0])
    return None


def read_skeleton_text(text: str, source_name: str = "<skeleton>",
                       max_frames: int | None = None) -> np.ndarray:
    """Parse the text of a ``.skeleton`` file into float32 ``(frames, 25, 3, 2)``.

    Only x, y, z (metres, camera space) are kept. Bodies are tracked across frames by
    ``bodyID``; the two most active ones are kept: activity is the variance over time of
    each joint coordinate, summed over joints and axes, computed over the frames in which
    the body appears. Slot 0 holds the most active body; ties go to the body seen first, so
    the order is deterministic. Frames in which a kept body is absent are all-zero.

    ``source_name`` is used in error messages (a file path or an upload's file name).
    Raises ``SkeletonFormatError`` for malformed text and ``EmptySkeletonError`` when no
    body appears in any frame. With ``max_frames``, a file that declares more frames is
    refused from its first line, before anything is split or allocated: the output array
    and the resampling after it grow with the declared count, whatever the file's size
    (two million empty frames take 6 MB of text and 600 MB as an array).
    """
    if max_frames is not None:
        declared = _declared_frame_count(text)
        if declared is not None and declared > max_frames:
            raise SkeletonFormatError(source_name, 1, f"{declared} frames is above the "
                                                      f"{max_frames}-frame limit")
    lines = _Lines(text, source_name)
    frame_count = lines.count("frame count")
    # bodyID -> (frame indices, joint arrays, order of first appearance)
    tracks: dict[int, tuple[list[int], list[np.ndarray], int]] = {}
    for frame in range(frame_count):
        body_count = lines.count(f"body count of frame {frame + 1}")
        seen_in_frame: set[int] = set()
        for _ in range(body_count):
            info, _ = lines.fields(10, "body info line")
            try:
                body_id = int(info[0])
            except ValueError:
                raise lines.error(f"bodyID must be an integer, got {info[0]!r}") from None
            _numbers(info[1:], lines, "body info")
            if body_id in seen_in_frame:
                raise lines.error(f"bodyID {body_id} appears twice in frame {frame + 1}")
            seen_in_frame.add(body_id)
            joint_count = lines.count("joint count")
            if joint_count != JOINTS:
                raise lines.error(f"joint count must be {JOINTS}, got {joint_count}")
            xyz = np.empty((JOINTS, 3), dtype=np.float64)
            for j in range(JOINTS):
                tokens, _ = lines.fields(12, f"joint {j + 1} of {JOINTS}")
                values = _numbers(tokens, lines, f"joint {j + 1}")
                if not all(math.isfinite(v) for v in values[:3]):
                    raise lines.error(f"joint {j + 1}: x, y, z must be finite")
                xyz[j] = values[:3]
            if body_id not in tracks:
                tracks[body_id] = ([], [], len(tracks))
            tracks[body_id][0].append(frame)
            tracks[body_id][1].append(xyz)
    # Anything after the last frame means the counts and the content disagree.
    for index in range(lines.pos, len(lines.lines)):
        if lines.lines[index].strip():
            raise lines.error(f"unexpected data after the last of {frame_count} frames",
                              index + 1)
    if not tracks:
        raise EmptySkeletonError(source_name, None,
                                 f"no body in any of the {frame_count} frames")

    def activity(item) -> tuple[float, int]:
        _, joints, first = item[1]
        motion = float(np.stack(joints).var(axis=0).sum()) if len(joints) > 1 else 0.0
        return (-motion, first)

    kept = sorted(tracks.items(), key=activity)[:BODIES]
    out = np.zeros((frame_count, JOINTS, 3, BODIES), dtype=np.float32)
    for slot, (_, (frames, joints, _)) in enumerate(kept):
        out[frames, :, :, slot] = np.stack(joints)
    return out


def read_skeleton_file(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Read a ``.skeleton`` file; see ``read_skeleton_text``. Errors name the path."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise SkeletonFormatError(path, data.count(b"\n", 0, exc.start) + 1,
                                  "not a text file (non-ASCII byte)") from None
    return read_skeleton_text(text, str(path), max_frames)


# --------------------------------------------------------------------------- array ops


def _presence(arr: np.ndarray) -> np.ndarray:
    """(T, M) bool: body m is present in frame t (any of its coordinates non-zero)."""
    return np.any(arr != 0, axis=(1, 2))


def resample_skeleton(arr: np.ndarray, frames: int) -> np.ndarray:
    """Resample ``(T, V, C, M)`` to ``frames`` time steps by linear interpolation.

    Target step i sits at source position ``i * (T - 1) / (frames - 1)`` (the first and last
    frames are kept), so it both stretches short clips and shrinks long ones; a one-frame
    clip is repeated. Where a body is present on one side of an interpolation interval and
    absent on the other, the nearer source frame is copied instead, so a body never fades
    in from the origin and absent stays exactly zero.
    """
    arr = np.asarray(arr)
    if arr.ndim != 4:
        raise ValueError(f"expected a (T, V, C, M) array, got shape {arr.shape}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    length = arr.shape[0]
    if length == 0:
        raise ValueError("cannot resample a skeleton with 0 frames")
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
    if length == 1:
        return np.repeat(arr.astype(dtype), frames, axis=0)
    pos = np.linspace(0.0, length - 1, frames)  # frames == 1 gives [0.0]
    lo = np.floor(pos).astype(np.int64).clip(0, length - 1)
    hi = np.minimum(lo + 1, length - 1)
    w = (pos - lo)[:, None, None, None]
    src = arr.astype(np.float64)
    out = (1.0 - w) * src[lo] + w * src[hi]
    present = _presence(arr)
    mixed = present[lo] != present[hi]  # (frames, M)
    if mixed.any():
        nearest = np.where(pos - lo < 0.5, lo, hi)
        t_idx, m_idx = np.nonzero(mixed)
        out[t_idx, :, :, m_idx] = src[nearest[t_idx], :, :, m_idx]
    return out.astype(dtype)


def scale_skeleton(arr: np.ndarray, skel_min: Sequence[float],
                   skel_max: Sequence[float]) -> np.ndarray:
    """Min-max scale ``(T, V, C, M)`` coordinates per axis to [0, 1] (clipped), float32.

    ``skel_min`` / ``skel_max`` are C floats (x, y, z; or x, y for 2-D pose), the dataset
    constants. Bodies that are absent in a frame (all zero) stay exactly 0 so "absent"
    remains recognisable.
    """
    arr = np.asarray(arr, dtype=np.float32)
    c = len(skel_min)
    if c not in (2, 3) or len(skel_max) != c:
        raise ValueError("skel_min and skel_max must hold 3 values (x, y, z) or 2 (x, y)")
    if arr.ndim != 4 or arr.shape[2] != c:
        raise ValueError(f"expected a (T, V, {c}, M) array, got shape {arr.shape}")
    lo = np.asarray(skel_min, dtype=np.float32).reshape(1, 1, c, 1)
    hi = np.asarray(skel_max, dtype=np.float32).reshape(1, 1, c, 1)
    span = np.maximum(hi - lo, np.float32(1e-6))  # a flat axis must not divide by zero
    out = np.clip((arr - lo) / span, 0.0, 1.0).astype(np.float32)
    present = _presence(arr)  # (T, M)
    out *= present[:, None, None, :]
    return out


# --------------------------------------------------------------------------- video


def _frame_indices(total: int, frames: int) -> np.ndarray:
    """``frames`` indices spread uniformly over ``total`` frames, first and last included."""
    return np.linspace(0, total - 1, frames).round().astype(np.int64)


def _resize_crop(rgb: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8: shorter side to ``size``, centre crop."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if min(h, w) != size:
        if h <= w:
            nh, nw = size, max(size, round(w * size / h))
        else:
            nh, nw = max(size, round(h * size / w)), size
        x = F.interpolate(x[None].float(), size=(nh, nw), mode="bilinear",
                          align_corners=False, antialias=True)[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size].contiguous()


@dataclass(frozen=True)
class VideoInfo:
    """What a container's header says about its first video stream (see ``probe_video``)."""

    width: int
    height: int
    frames: int  # 0 when the container stores no count (Matroska, WebM)
    duration_s: float | None  # None when the container does not say
    codec: str


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on what a video may cost to decode; None means unbounded.

    ``check_header`` refuses a clip from its header alone; ``check_frame`` is applied to
    every decoded frame, because a header can understate the length or the size.
    """

    max_frames: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    max_seconds: float | None = None

    def _check_size(self, width: int, height: int, name: str) -> None:
        if ((self.max_width is not None and width > self.max_width)
                or (self.max_height is not None and height > self.max_height)):
            limit = f"{self.max_width or 'any'}x{self.max_height or 'any'}"
            raise VideoTooLargeError(name, f"{width}x{height} is above the {limit} limit")

    def check_header(self, info: VideoInfo, name: str) -> None:
        self._check_size(info.width, info.height, name)
        if self.max_frames is not None and info.frames > self.max_frames:
            raise VideoTooLargeError(name, f"{info.frames} frames is above the {self.max_frames}-frame limit")
        if (self.max_seconds is not None and info.duration_s is not None
                and info.duration_s > self.max_seconds):
            raise VideoTooLargeError(name, f"{info.duration_s:.1f} s is above the {self.max_seconds:g} s limit")

    def check_frame(self, count: int, width: int, height: int, info: VideoInfo, name: str) -> None:
        """Frame number ``count`` (1-based) has just been decoded."""
        self._check_size(width, height, name)
        if self.max_frames is not None and count > self.max_frames:
            declared = f" (its header declares {info.frames})" if info.frames else ""
            raise VideoTooLargeError(name, f"more than {self.max_frames} frames decoded{declared}; above the "
                                           f"{self.max_frames}-frame limit")


@contextmanager
def _av_errors(name: str) -> Iterator[None]:
    """PyAV and I/O failures as ``VideoDecodeError`` naming the file. A failed allocation
    stays a ``MemoryError`` (PyAV's ENOMEM error is one), so a caller with a memory budget
    can tell "too big" from "corrupt"."""
    try:
        yield
    except (VideoDecodeError, MemoryError):
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise VideoDecodeError(name, f"cannot decode video: {exc}") from exc


def _stream_info(container: "av.container.InputContainer", stream: "av.video.stream.VideoStream") -> VideoInfo:
    ctx = stream.codec_context
    if stream.duration is not None and stream.time_base is not None:
        duration: float | None = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = None
    return VideoInfo(width=int(ctx.width or 0), height=int(ctx.height or 0), frames=int(stream.frames or 0),
                     duration_s=duration, codec=ctx.name or "")


def _opener(source: str | os.PathLike | BinaryIO,
            name: str | None) -> tuple[str, Callable[[], "av.container.InputContainer"]]:
    """(label for errors, a function opening the container afresh) for a path or a file."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        label = name or path
        if not os.path.isfile(path):
            raise VideoDecodeError(label, "no such file")
        return label, lambda: av.open(path, mode="r")
    label = name or getattr(source, "name", None) or "<upload>"
    start = source.tell()

    def open_file():
        source.seek(start)
        return av.open(source, mode="r")

    return label, open_file


def probe_video(source: str | os.PathLike | BinaryIO, name: str | None = None) -> VideoInfo:
    """The header of a video's first stream: size, frame count, duration and codec.

    Opens the container without decoding the clip (FFmpeg's stream probe may decode a few
    frames within its probe size to learn the codec parameters). Raises
    ``VideoDecodeError`` naming the file if it cannot be opened or has no video stream.
    """
    label, open_container = _opener(source, name)
    with _av_errors(label), open_container() as container:
        if not container.streams.video:
            raise VideoDecodeError(label, "no video stream")
        return _stream_info(container, container.streams.video[0])


def _video_stream(container, name: str, threads: int | None):
    """The first video stream, with FFmpeg's threading set (None: FFmpeg's choice)."""
    if not container.streams.video:
        raise VideoDecodeError(name, "no video stream")
    stream = container.streams.video[0]
    if threads is None:
        stream.thread_type = "AUTO"
    else:
        stream.thread_count = threads
    return stream


def _decode(open_container: Callable[[], "av.container.InputContainer"], name: str,
            frames: int, size: int, total: int | None, limits: VideoLimits,
            threads: int | None = None) -> tuple[int, int, dict]:
    """Decode every frame, converting only the sampled ones.

    Indices are chosen for ``total`` frames, or for the container's own frame count when
    ``total`` is None. Returns (frames decoded, total assumed, {index: (3, size, size)}).
    """
    kept: dict[int, torch.Tensor] = {}
    count = 0
    with _av_errors(name), open_container() as container:
        stream = _video_stream(container, name, threads)
        info = _stream_info(container, stream)
        limits.check_header(info, name)
        if total is None:
            total = info.frames
        wanted = set(_frame_indices(total, frames).tolist()) if total > 0 else set()
        for frame in container.decode(stream):
            limits.check_frame(count + 1, frame.width, frame.height, info, name)
            if count in wanted:
                kept[count] = _resize_crop(frame.to_ndarray(format="rgb24"), size)
            count += 1
    return count, total, kept


def read_video(source: str | os.PathLike | BinaryIO, frames: int, size: int,
               name: str | None = None, *, max_frames: int | None = None, max_width: int | None = None,
               max_height: int | None = None, max_seconds: float | None = None,
               threads: int | None = None) -> np.ndarray:
    """Decode a video into uint8 ``(3, frames, size, size)`` RGB.

    ``source`` is a path or a seekable binary file object (an upload; see also
    ``read_video_bytes``). All frames are decoded (codecs are sequential) but only the
    ``frames`` sampled ones are converted and resized, uniformly spread over the clip with
    the first and last frame included (short clips repeat frames). Each sampled frame's
    shorter side is resized to ``size`` (bilinear, antialiased, ``torch.nn.functional.
    interpolate``), then centre-cropped to ``size`` x ``size``. Memory stays at about
    ``frames`` small frames even for 1920x1080 sources.

    The container's frame count (exact for AVI) picks the indices in a single pass; if the
    decoded count disagrees the clip is decoded a second time with the true count.
    Raises ``VideoDecodeError`` naming the file (or ``name``) if the source cannot be
    opened or decoded or holds no frame.

    The ``max_*`` limits (None: unbounded) bound the cost of an untrusted clip: a header
    declaring a larger size, more frames or a longer duration is refused before any frame
    is decoded, and decoding stops at the first frame beyond ``max_frames`` or larger than
    the size limit. Either raises ``VideoTooLargeError`` naming the limit.

    ``threads``: FFmpeg decoding threads (None lets FFmpeg use every core; a pool of
    decoding processes passes 1). The decoded pixels do not depend on it.
    """
    if frames < 1 or size < 1:
        raise ValueError(f"frames and size must be >= 1, got {frames}, {size}")
    limits = VideoLimits(max_frames, max_width, max_height, max_seconds)
    label, open_container = _opener(source, name)
    count, assumed, kept = _decode(open_container, label, frames, size, None, limits, threads)
    if count == 0:
        raise VideoDecodeError(label, "the video holds no decodable frame")
    if count != assumed:
        # Header count missing or wrong: decode again now that the true count is known.
        count2, _, kept = _decode(open_container, label, frames, size, count, limits, threads)
        if count2 != count:
            raise VideoDecodeError(label, f"decoded {count} then {count2} frames")
    indices = _frame_indices(count, frames)
    return torch.stack([kept[int(i)] for i in indices], dim=1).numpy()


def read_video_window(path: str | os.PathLike, first: int, last: int, frames: int, size: int,
                      threads: int | None = None) -> np.ndarray:
    """uint8 ``(3, frames, size, size)`` from frames ``first``..``last`` (0-based,
    inclusive) of a longer video: a labelled clip of an iMiGUE-style interview. The frames
    are sampled over the window as ``read_video`` samples a whole clip; decoding stops
    after ``last``. A video shorter than the window is a ``VideoDecodeError``."""
    if frames < 1 or size < 1:
        raise ValueError(f"frames and size must be >= 1, got {frames}, {size}")
    if first < 0 or last < first:
        raise ValueError(f"frames {first}..{last} are not a range")
    label, open_container = _opener(path, None)
    indices = first + _frame_indices(last - first + 1, frames)
    wanted = set(indices.tolist())
    kept: dict[int, torch.Tensor] = {}
    count = 0
    with _av_errors(label), open_container() as container:
        stream = _video_stream(container, label, threads)
        for frame in container.decode(stream):
            if count in wanted:
                kept[count] = _resize_crop(frame.to_ndarray(format="rgb24"), size)
            count += 1
            if count > last:
                break
    if count <= last:
        raise VideoDecodeError(label, f"the video has {count} frames; the clip asks for frames {first}..{last}")
    return torch.stack([kept[int(i)] for i in indices], dim=1).numpy()


def read_video_bytes(data: bytes, frames: int, size: int, name: str = "<upload>") -> np.ndarray:
    """``read_video`` for an in-memory upload; ``name`` is used in error messages."""
    if not data:
        raise VideoDecodeError(name, "empty upload")
    return read_video(io.BytesIO(data), frames, size, name=name)


# --------------------------------------------------------------------------- dataset root


@dataclass(frozen=True)
class SampleFiles:
    """One sample of a dataset root: its id and the files present (None when missing)."""

    id: SampleId
    skeleton: Path | None
    video: Path | None

    @property
    def name(self) -> str:
        return self.id.name


def _scan(directory: Path, suffix: str) -> Iterable[tuple[SampleId, Path]]:
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.endswith(suffix) and entry.is_file():
            yield parse_sample_name(entry.name[: -len(suffix)]), entry


def find_samples(root: str | os.PathLike) -> list[SampleFiles]:
    """List the samples under ``root`` in the real layout, sorted by name.

    A sample appears if either of its files exists (``ROOT/nturgb+d_skeletons/X.skeleton``
    or ``ROOT/nturgb+d_rgb/X_rgb.avi``); the other is ``None`` when missing. Files with
    other suffixes are ignored; a ``.skeleton`` / ``_rgb.avi`` file whose name is not an
    NTU sample name raises ValueError naming it. Raises FileNotFoundError if neither
    directory exists.
    """
    root = Path(root)
    skel_dir, rgb_dir = root / SKELETON_DIR, root / RGB_DIR
    if not skel_dir.is_dir() and not rgb_dir.is_dir():
        raise FileNotFoundError(
            f"{root}: not an NTU RGB+D root (expected {SKELETON_DIR}/ and {RGB_DIR}/)")
    skeletons = dict(_scan(skel_dir, SKELETON_SUFFIX))
    videos = dict(_scan(rgb_dir, VIDEO_SUFFIX))
    return [SampleFiles(sid, skeletons.get(sid), videos.get(sid))
            for sid in sorted(set(skeletons) | set(videos), key=lambda s: s.name)]


def class_names(root: str | os.PathLike) -> list[str]:
    """Class names of a dataset: ``ROOT/classes.txt`` (one per line, blank lines ignored)
    when present, else the 60 NTU RGB+D names."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        return list(NTU60_CLASSES)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names
