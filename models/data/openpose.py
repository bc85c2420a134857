"""OpenPose per-frame JSON → the 22-joint 2-D upper-body skeleton of iMiGUE-style data.

iMiGUE (Liu et al., CVPR 2021) ships OpenPose 1.3 output: one JSON file per video frame,
``{"version": 1.3, "people": [{"pose_keypoints_2d": [x, y, c] × 25 (BODY_25),
"hand_left_keypoints_2d": [x, y, c] × 21, "hand_right_keypoints_2d": [x, y, c] × 21,
"face_keypoints_2d": ...}, ...]}``, in image pixels, ``c`` the detector's confidence
(0 for a keypoint it did not find, reported at (0, 0)). Skeleton methods on iMiGUE use 22
upper-body joints; ``JOINT_MAP`` is ours, written down here because the public code
disagrees on the order of the two hands:

====  ==========================  =========================================
 idx  joint                       from
====  ==========================  =========================================
 0    nose                        BODY_25 0
 1    neck                        BODY_25 1
 2-4  right shoulder, elbow, wrist  BODY_25 2, 3, 4
 5-7  left shoulder, elbow, wrist   BODY_25 5, 6, 7
 8-9  right eye, left eye         BODY_25 15, 16
10-11 right ear, left ear         BODY_25 17, 18
12-16 right thumb … little finger tips  hand_right 4, 8, 12, 16, 20
17-21 left thumb … little finger tips   hand_left 4, 8, 12, 16, 20
====  ==========================  =========================================

The lower body (hips, knees, feet) is left out: the subjects sit behind a desk. ``BONES``
is the tree over these joints (neck as the centre), for drawing and for graph models.

Per frame the reader keeps one person, the one whose BODY_25 confidences sum highest (the
interviewee fills the frame); a frame with nobody is an absent body (all zeros, as NTU's
absent bodies). A keypoint below ``MIN_CONFIDENCE`` in a frame where the person is present
is filled by linear interpolation between the nearest frames where it was found (held at
the ends), or 0 when it is never found: OpenPose's (0, 0) would otherwise read as a real
position in the image corner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .ntu import EmptySkeletonError, SkeletonFormatError

BODY25_JOINTS = (0, 1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18)
FINGERTIPS = (4, 8, 12, 16, 20)  # thumb, index, middle, ring and little finger tips in OpenPose's hand model
JOINTS = len(BODY25_JOINTS) + 2 * len(FINGERTIPS)  # 22
JOINT_NAMES = ("nose", "neck", "right shoulder", "right elbow", "right wrist", "left shoulder", "left elbow",
               "left wrist", "right eye", "left eye", "right ear", "left ear",
               *(f"right {f} tip" for f in ("thumb", "index", "middle", "ring", "little")),
               *(f"left {f} tip" for f in ("thumb", "index", "middle", "ring", "little")))
BONES = ((1, 0), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (0, 8), (8, 10), (0, 9), (9, 11),
         *((4, 12 + k) for k in range(5)), *((7, 17 + k) for k in range(5)))
COORDS = 2
MIN_CONFIDENCE = 0.05
_PARTS = (("pose_keypoints_2d", 25), ("hand_right_keypoints_2d", 21), ("hand_left_keypoints_2d", 21))


def _keypoints(person: dict, key: str, count: int, path: str) -> np.ndarray:
    """(count, 3) x, y, confidence of one part of a person; a missing hand is all zero."""
    values = person.get(key)
    if values is not None and not isinstance(values, list):
        raise SkeletonFormatError(path, None, f"{key} is a {type(values).__name__}, not a list of numbers")
    if values is None or (key != "pose_keypoints_2d" and len(values) == 0):
        if key == "pose_keypoints_2d":
            raise SkeletonFormatError(path, None, "a person without pose_keypoints_2d")
        return np.zeros((count, 3), np.float32)
    if not isinstance(values, list) or len(values) != 3 * count:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise SkeletonFormatError(path, None, f"{key} holds {got} values; expected {3 * count} "
                                              f"({count} keypoints × x, y, confidence"
                                              + (", OpenPose BODY_25)" if count == 25 else ")"))
    try:
        array = np.asarray(values, dtype=np.float64).reshape(count, 3)
    except (TypeError, ValueError, OverflowError):
        raise SkeletonFormatError(path, None, f"{key} holds a value that is not a number") from None
    if not np.isfinite(array).all():
        raise SkeletonFormatError(path, None, f"{key} holds NaN or infinite values")
    return array.astype(np.float32)


def read_openpose_frame(data: bytes | str | dict, path: str = "<frame>") -> np.ndarray | None:
    """One OpenPose JSON document (text, or already parsed) → (22, 3) x, y, confidence of
    its main person, or None when nobody was detected. Errors (``SkeletonFormatError``)
    name ``path``."""
    try:
        doc = data if isinstance(data, dict) else json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SkeletonFormatError(path, getattr(exc, "lineno", None), f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("people"), list):
        raise SkeletonFormatError(path, None, 'not an OpenPose frame: expected an object with a "people" list')
    best, best_score = None, -1.0
    for person in doc["people"]:
        if not isinstance(person, dict):
            raise SkeletonFormatError(path, None, "an entry of people is not an object")
        pose = _keypoints(person, "pose_keypoints_2d", 25, path)
        score = float(pose[:, 2].sum())
        if score > best_score:
            best, best_score = person, score
    if best is None:
        return None
    pose, right, left = (_keypoints(best, key, count, path) for key, count in _PARTS)
    return np.concatenate([pose[list(BODY25_JOINTS)], right[list(FINGERTIPS)], left[list(FINGERTIPS)]])


def _fill_missing(points: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(T, V, 3) with confidences → (T, V, 2): low-confidence keypoints of present frames
    interpolated over time per joint (held at the ends), 0 when never found; absent frames 0."""
    frames = points.shape[0]
    out = np.zeros((frames, points.shape[1], COORDS), np.float32)
    t = np.arange(frames)
    for v in range(points.shape[1]):
        found = present & (points[:, v, 2] >= MIN_CONFIDENCE)
        if not found.any():
            continue
        for c in range(COORDS):
            out[:, v, c] = np.interp(t, t[found], points[found, v, c])
    out[~present] = 0.0
    return out


def read_openpose_frames(frames: Sequence[bytes | str | dict], names: Sequence[str] | None = None) -> np.ndarray:
    """A clip's per-frame OpenPose documents (text or parsed, in time order) → float32 ``(T, 22, 2, 1)``,
    the layout ``ntu.read_skeleton_file`` gives (frames, joints, coordinates, bodies).
    Raises ``EmptySkeletonError`` when nobody appears in any frame."""
    names = list(names) if names is not None else [f"<frame {i}>" for i in range(len(frames))]
    if not frames:
        raise SkeletonFormatError(names[0] if names else "<clip>", None, "no frame")
    points = np.zeros((len(frames), JOINTS, 3), np.float32)
    present = np.zeros(len(frames), bool)
    for i, (data, name) in enumerate(zip(frames, names)):
        person = read_openpose_frame(data, name)
        if person is not None:
            points[i], present[i] = person, True
    if not present.any():
        raise EmptySkeletonError(names[0], None, f"nobody detected in any of {len(frames)} frames")
    return _fill_missing(points, present)[..., None]


def read_openpose_dir(directory: str | os.PathLike, first: int | None = None, last: int | None = None) -> np.ndarray:
    """The frames of one video's OpenPose output directory (``<video>_<frame:012d>_keypoints.json``
    files), frames ``first``..``last`` inclusive (default: all), as ``read_openpose_frames``.
    A frame file missing inside the range counts as a frame where nobody was detected."""
    directory = Path(directory)
    files = {}
    for path in directory.glob("*_keypoints.json"):
        stem = path.name[: -len("_keypoints.json")]
        number = stem.rsplit("_", 1)[-1]
        if number.isdigit():
            files[int(number)] = path
    if not files:
        raise SkeletonFormatError(directory, None, "no *_<frame>_keypoints.json file")
    lo = min(files) if first is None else int(first)
    hi = max(files) if last is None else int(last)
    if hi < lo:
        raise SkeletonFormatError(directory, None, f"frame range {lo}..{hi} is empty")
    if lo < min(files) or hi > max(files):
        # Bounds the work by the files present: a labels row of frames 0..10**12 is an error,
        # not a trillion-frame clip of "nobody detected".
        raise SkeletonFormatError(directory, None, f"frame range {lo}..{hi} reaches beyond the OpenPose files, "
                                                   f"which cover frames {min(files)}..{max(files)}")
    empty = json.dumps({"people": []})
    frames = [files[f].read_bytes() if f in files else empty for f in range(lo, hi + 1)]
    names = [str(files.get(f, directory / f"<missing frame {f}>")) for f in range(lo, hi + 1)]
    return read_openpose_frames(frames, names)
