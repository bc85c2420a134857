"""Synthetic dataset writer in the iMiGUE-style layout (``models.data.imigue``).

The real iMiGUE release cannot be downloaded here. This writes what its reader takes:
``classes.txt``, ``labels.csv``, ``split.json``, one MPEG-4 video per recording session
under ``videos/`` and one OpenPose 1.3 JSON file per frame of it under ``skeleton/<video>/``.

A session is one subject performing every class once, in an order drawn per session,
each clip followed by a few frames of standing still, as the labelled gestures of an
interview are separated by unlabelled frames. The bodies are those of ``synth`` (the same
forward kinematics, styles and drawing, one camera facing the subject), restricted to
motions of the arms, trunk and head: the OpenPose skeleton keeps the upper body only.

The JSON is what OpenPose writes for the rendered frame: every BODY_25 keypoint and
21 keypoints per hand in pixels of the video, with a confidence. Hips, legs and feet are
reported as not found (0, 0, 0), as for a subject sitting behind a desk; a few upper-body
keypoints per clip drop below the reader's confidence threshold, and a frame now and then
holds a second, faint detection, so that the reader's gap filling and main-person choice
are exercised. Class ids in ``labels.csv`` run 1..K; the last class is written as 99, the
id iMiGUE gives its non-micro-gesture class.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import imigue
from .ntu import XSUB_TRAIN_SUBJECTS
from .synth import (_PALETTE, FPS, MOTIONS, _forward_kinematics, _motion, _pose_params, _project, _render, _rot,
                    _subject_style, _write_text, _write_video, class_table)

# The motions of ``synth.MOTIONS`` an upper-body skeleton shows, in class order.
UPPER_BODY_MOTIONS = tuple(next(i for i, (n, _) in enumerate(MOTIONS) if n == name) for name in (
    "wave right hand", "raise both arms", "clap hands", "punch forward", "bend to the side", "bow"))
GAP_FRAMES = 6
# BODY_25 keypoint k ← Kinect joint (``synth``'s 25-joint skeleton); None: not found.
_BODY25_FROM = (3, 20, 8, 9, 10, 4, 5, 6, None, None, None, None, None, None, None,
                "r_eye", "l_eye", "r_ear", "l_ear", None, None, None, None, None, None)


def _face_points(j: np.ndarray) -> dict[str, np.ndarray]:
    """Eyes and ears (T, 3) beside the head joint, facing the body's front."""
    head, neck = j[:, 3], j[:, 2]
    right = j[:, 8] - j[:, 4]  # from the left shoulder to the right one
    right /= np.maximum(np.linalg.norm(right, axis=1, keepdims=True), 1e-6)
    up = head - neck
    up /= np.maximum(np.linalg.norm(up, axis=1, keepdims=True), 1e-6)
    front = np.cross(up, right)
    return {"r_eye": head + 0.035 * right + 0.02 * up + 0.07 * front,
            "l_eye": head - 0.035 * right + 0.02 * up + 0.07 * front,
            "r_ear": head + 0.075 * right, "l_ear": head - 0.075 * right}


def _hand_points(j: np.ndarray, wrist: int, tip: int, thumb: int) -> np.ndarray:
    """OpenPose's 21 hand keypoints (T, 21, 3): the wrist, then 4 points per finger from the
    thumb to the little finger, spread across the palm's width."""
    w, t, th = j[:, wrist], j[:, tip], j[:, thumb]
    across = th - (w + t) / 2
    across /= np.maximum(np.linalg.norm(across, axis=1, keepdims=True), 1e-6)
    out = np.empty((j.shape[0], 21, 3))
    out[:, 0] = w
    for k in range(4):
        out[:, 1 + k] = w + (th - w) * (k + 1) / 4 + 0.01 * k * across
    for finger, offset in enumerate((0.02, 0.0, -0.02, -0.04)):  # index .. little finger
        for k in range(4):
            out[:, 5 + 4 * finger + k] = w + (t - w) * (0.45 + 0.55 * (k + 1) / 4) + offset * across
    return out


def _openpose_people(j: np.ndarray, w: int, h: int, rng: np.random.Generator) -> list[list[dict]]:
    """Per frame, the OpenPose ``people`` list of one body (T, 25, 3) in camera space."""
    frames = j.shape[0]
    face = _face_points(j)
    body = np.zeros((frames, 25, 3))
    for k, source in enumerate(_BODY25_FROM):
        if source is not None:
            body[:, k] = face[source] if isinstance(source, str) else j[:, source]
    found = np.array([s is not None for s in _BODY25_FROM])
    hands = {"hand_right_keypoints_2d": _hand_points(j, 10, 23, 24),
             "hand_left_keypoints_2d": _hand_points(j, 6, 21, 22)}
    pix = {"pose_keypoints_2d": _project(body, w, h), **{k: _project(v, w, h) for k, v in hands.items()}}
    conf = {"pose_keypoints_2d": np.where(found, rng.uniform(0.55, 0.95, (frames, 25)), 0.0),
            **{k: rng.uniform(0.3, 0.8, (frames, 21)) for k in hands}}
    # A few keypoints lost for a few frames (the reader fills them in over time).
    for _ in range(3):
        k = int(rng.choice(np.flatnonzero(found)))
        f0 = int(rng.integers(0, max(1, frames - 3)))
        conf["pose_keypoints_2d"][f0:f0 + 3, k] = 0.01
    people = []
    for f in range(frames):
        person = {}
        for key, xy in pix.items():
            c = conf[key][f]
            values = np.concatenate([np.where(c[:, None] > 0, xy[f], 0.0), c[:, None]], axis=1)
            person[key] = [round(float(v), 3) for v in values.ravel()]
        person["face_keypoints_2d"] = []
        frame = [person]
        if rng.random() < 0.03:  # a faint false detection in the background
            ghost = {"pose_keypoints_2d": [round(float(v), 3) for v in
                                           np.column_stack([rng.uniform(0, w, 25), rng.uniform(0, h, 25),
                                                            rng.uniform(0, 0.1, 25)]).ravel()]}
            frame.insert(int(rng.integers(0, 2)), ghost)
        people.append(frame)
    return people


def _session_timeline(subject: int, session: int, table: list, frames: int, seed: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Joints (T, 25, 3) of one session, the held object per frame, and its clips as
    (class, first frame, last frame)."""
    style = _subject_style(seed, subject)
    order = rng.permutation(len(table))
    pieces, held, clips, at = [], [], [], 0
    t = np.linspace(0.0, 1.0, frames)
    yaw = math.radians(rng.uniform(-10, 10))
    offset = np.array([rng.uniform(-0.05, 0.05), 0.0, 3.0 + rng.uniform(-0.15, 0.15)])
    for label in order:
        _, motion, obj = table[label]
        speed = style["speed"] * rng.uniform(0.95, 1.05)
        amp = style["amp"] * rng.uniform(0.95, 1.05)
        phase = style["phase"] + rng.uniform(-0.3, 0.3)
        params = _motion(motion, t, speed, amp, phase)[0]
        still = _pose_params(np.zeros(GAP_FRAMES))
        for p, n, o in ((params, frames, obj), (still, GAP_FRAMES, 0)):
            joints = _forward_kinematics(p, style["scale"])
            joints = np.einsum("tij,tvj->tvi", _rot("y", np.full(n, yaw)), joints) + offset
            joints += rng.normal(0.0, 0.004, joints.shape)
            pieces.append(joints)
            held.append(np.full(n, o))
        clips.append((int(label), at, at + frames - 1))
        at += frames + GAP_FRAMES
    return np.concatenate(pieces), np.concatenate(held), clips


def synthesize_imigue(root: str | os.PathLike, num_classes: int = 6,
                      subjects: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), sessions: int = 6, frames: int = 48,
                      video_size: tuple[int, int] = (96, 72), seed: int = 0, objects: int = 1,
                      clutter: float = 1.0, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write an iMiGUE-style synthetic dataset under ``root``; return a summary.

    One video per (subject, session), named ``SSSS_NN`` (subject, session), holding one
    clip of every class. ``split.json`` trains on the subjects that NTU's X-Sub protocol
    trains on (1, 2, 4, 5, 8 of the default) and tests on the others. ``objects`` as in
    ``synth.synthesize``, and ``clutter`` too; classes are ``UPPER_BODY_MOTIONS`` × objects. Deterministic in
    its arguments."""
    started = time.perf_counter()
    table = class_table(num_classes, objects, UPPER_BODY_MOTIONS)
    subjects = [int(s) for s in subjects]
    if not subjects or len(set(subjects)) != len(subjects) or any(not 1 <= s <= 9999 for s in subjects):
        raise ValueError("subjects must be a non-empty list of distinct integers in 1..9999")
    train = [s for s in subjects if s in XSUB_TRAIN_SUBJECTS]
    test = [s for s in subjects if s not in XSUB_TRAIN_SUBJECTS]
    if not train or not test:
        raise ValueError(f"subjects must include X-Sub training subjects ({XSUB_TRAIN_SUBJECTS[:5]}…) and others")
    if not 1 <= sessions <= 99 or frames < 2:
        raise ValueError("sessions must be in 1..99 and frames >= 2")
    width, height = (int(v) for v in video_size)
    if not (16 <= width <= 4096 and 16 <= height <= 4096) or width % 2 or height % 2:
        raise ValueError(f"video_size must be even and in 16..4096, got {video_size}")
    root = Path(root)
    (root / imigue.VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    (root / imigue.SKELETON_DIR).mkdir(parents=True, exist_ok=True)
    names = [name for name, _, _ in table]
    _write_text(root / imigue.CLASSES_FILE, "\n".join(names) + "\n")
    _write_text(root / imigue.SPLIT_FILE, json.dumps({"train_subjects": train, "test_subjects": test}) + "\n")
    rows = []
    total = len(subjects) * sessions
    done = 0
    for subject in subjects:
        for session in range(1, sessions + 1):
            video_id = f"{subject:04d}_{session:02d}"
            rng = np.random.default_rng([seed, 2, subject, session])
            joints, held, clips = _session_timeline(subject, session, table, frames, seed, rng)
            colour = _PALETTE[rng.integers(len(_PALETTE))]
            held_colour = _PALETTE[rng.integers(len(_PALETTE))]
            skel_dir = root / imigue.SKELETON_DIR / video_id
            skel_dir.mkdir(exist_ok=True)
            for f, people in enumerate(_openpose_people(joints, width, height, rng)):
                _write_text(skel_dir / f"{video_id}_{f:012d}_keypoints.json",
                            json.dumps({"version": 1.3, "people": people}, separators=(",", ":")))
            _write_video(root / imigue.VIDEO_DIR / f"{video_id}.mp4",
                         _render([joints], width, height, colour, rng, held, held_colour, clutter), width, height,
                         container_format="mp4")
            for label, first, last in clips:
                class_id = imigue.NON_MICRO_GESTURE if label == len(table) - 1 else label + 1
                rows.append((video_id, class_id, first, last, subject))
            done += 1
            if progress is not None:
                progress(done, total)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(imigue.REQUIRED_COLUMNS)
    writer.writerows(rows)
    _write_text(root / imigue.LABELS_FILE, buf.getvalue())
    return {"root": str(root), "layout": "imigue", "num_samples": len(rows), "num_classes": len(table),
            "class_names": names, "subjects": subjects, "train_subjects": train, "test_subjects": test,
            "sessions": sessions, "frames": frames, "video_size": [width, height], "objects": objects, "clutter": clutter,
            "fps": FPS, "seed": seed, "seconds": round(time.perf_counter() - started, 3)}
