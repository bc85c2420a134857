"""Synthetic dataset writer in the exact NTU RGB+D layout.

The real NTU RGB+D 60 release cannot be downloaded here, so this module writes a small
dataset that the real reader (``models.data.ntu``) and cache (``models.data.cache``) consume
unchanged: ``ROOT/nturgb+d_skeletons/SsssCcccPpppRrrrAaaa.skeleton`` text files with every
field of the Kinect v2 format, ``ROOT/nturgb+d_rgb/SsssCcccPpppRrrrAaaa_rgb.avi`` (MPEG-4
Part 2 in AVI, written with PyAV) and ``ROOT/classes.txt``.

Each class is a distinct parametric whole-body motion of a 25-joint skeleton, built by
forward kinematics (trunk, head, two arms with elbows, two legs with knees, feet kept on
the ground). Per subject the body size, speed, amplitude and phase vary; per replication
the facing direction changes a little; each camera id views the scene from
its own angle about the vertical axis (camera 1: 0 deg, 2: +45 deg, 3: -45 deg, further ids
step by 45 deg). One class ("walk towards each other") has two bodies.

The video is rendered from the same 3-D skeleton: projected with a pinhole camera and drawn
as a stick figure with thick, outlined limbs over a cluttered, moving background (a drifting
colour texture, moving blobs and pixel noise). The figure colour is drawn at random per
sample, never tied to the class, so the RGB stream has to be classified from motion and shape, and the
skeleton stream from the joints alone.

Everything is plain numpy (drawing included) plus PyAV for encoding.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

from .ntu import (BONES, CLASSES_FILE, JOINTS, RGB_DIR, SKELETON_DIR, SKELETON_SUFFIX,
                  VIDEO_SUFFIX, SampleId)

FPS = 30
SETUP = 1  # every synthetic sample is recorded in "setup" S001

# Class name and number of bodies, in label order. ``num_classes=K`` uses the first K.
MOTIONS: tuple[tuple[str, int], ...] = (
    ("wave right hand", 1),
    ("raise both arms", 1),
    ("squat", 1),
    ("kick with right leg", 1),
    ("jump up", 1),
    ("walk towards each other", 2),
    ("bow", 1),
    ("turn around", 1),
    ("clap hands", 1),
    ("punch forward", 1),
    ("walk across", 1),
    ("bend to the side", 1),
)
MAX_CLASSES = len(MOTIONS)
# What a body may hold in its right hand, drawn in the video only (the skeleton is the same
# with or without it): with ``objects=n`` every motion comes in n classes, one per entry
# of this table, as NTU's "drink water" and "eat meal" differ less in the joints than in
# what the camera sees. Entry 0 is the empty hand.
OBJECTS: tuple[str, ...] = ("", "holding a long stick", "holding a big ball")
_STICK_LENGTH, _STICK_RADIUS, _BALL_RADIUS = 0.95, 0.05, 0.2  # metres

# Body segment lengths in metres for a body scale of 1.
_SPINE_MID, _SPINE_SHOULDER, _NECK, _HEAD = 0.27, 0.50, 0.58, 0.14
_SHOULDER_X, _SHOULDER_Y = 0.18, 0.48
_UPPER_ARM, _FOREARM, _HAND, _HAND_TIP = 0.29, 0.26, 0.08, 0.07
_HIP_X, _HIP_Y = 0.09, -0.04
_THIGH, _SHIN, _FOOT = 0.43, 0.42, 0.12

# Kinect v2 intrinsics, used only for the depthX/depthY/colorX/colorY fields of the file.
_COLOR_F, _COLOR_C = 1081.4, (959.5, 539.5)
_DEPTH_F, _DEPTH_C = 365.5, (257.0, 205.0)

# Joints whose orientation Kinect reports as 0 0 0 0 (end effectors).
_NO_ORIENTATION = {3, 15, 19, 21, 22, 23, 24}

_GREY = np.float32(110.0)
_PALETTE = np.array([
    (255, 40, 40), (40, 220, 40), (60, 90, 255), (255, 220, 0), (255, 0, 220),
    (0, 230, 230), (255, 140, 0), (160, 60, 255),
], dtype=np.float32)


# --------------------------------------------------------------------------- kinematics


def _rot(axis: str, angle: np.ndarray) -> np.ndarray:
    """Rotation matrices (T, 3, 3) about a coordinate axis (right-handed)."""
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    r = np.zeros(angle.shape + (3, 3))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    k = 3 - i - j
    r[..., k, k] = 1.0
    r[..., i, i], r[..., i, j], r[..., j, i], r[..., j, j] = c, -s, s, c
    return r


def _apply(r: np.ndarray, v) -> np.ndarray:
    """Apply (T, 3, 3) rotations to (T, 3) or (3,) vectors."""
    v = np.broadcast_to(np.asarray(v, dtype=np.float64), r.shape[:-1])
    return np.einsum("tij,tj->ti", r, v)


_DOWN = (0.0, -1.0, 0.0)
_FORWARD = (0.0, 0.0, -1.0)  # a body with yaw 0 faces the camera (camera looks along +z)


def _pose_params(t: np.ndarray) -> dict[str, np.ndarray]:
    """Neutral standing pose: arms hanging slightly apart, elbows a little bent."""
    z = np.zeros_like(t)
    p = {name: z.copy() for name in (
        "yaw", "bow", "roll", "nod", "lift", "x", "z",
        "a_l", "f_l", "e_l", "ea_l", "a_r", "f_r", "e_r", "ea_r",
        "h_l", "k_l", "h_r", "k_r")}
    for side in ("l", "r"):
        p[f"a_{side}"] += math.radians(10)
        p[f"e_{side}"] += math.radians(10)
    return p


def _forward_kinematics(p: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """Joint positions (T, 25, 3) in metres for pose parameters over time.

    Angles in radians: ``a`` raises an arm sideways, ``f`` forwards, ``e`` bends the elbow,
    ``ea`` swings the forearm sideways; ``h`` flexes a hip forwards, ``k`` bends a knee;
    ``bow`` / ``roll`` / ``nod`` tilt trunk and head; ``yaw`` turns the whole body; ``x``,
    ``z`` move it on the floor and ``lift`` raises it (jumps). The lower ankle is kept on
    the floor, so bending the knees lowers the body.
    """
    steps = p["yaw"].shape[0]
    j = np.zeros((steps, JOINTS, 3))
    trunk = _rot("z", p["roll"]) @ _rot("x", -p["bow"])  # bow > 0 leans forwards (-z)

    def up(y):
        return np.array([0.0, y * scale, 0.0])

    j[:, 1] = _apply(trunk, up(_SPINE_MID))
    j[:, 20] = _apply(trunk, up(_SPINE_SHOULDER))
    j[:, 2] = _apply(trunk, up(_NECK))
    j[:, 3] = j[:, 2] + _apply(trunk @ _rot("x", -p["nod"]), up(_HEAD))
    for side, sign, (sh, el, wr, ha, tip, th) in (
            ("l", 1.0, (4, 5, 6, 7, 21, 22)), ("r", -1.0, (8, 9, 10, 11, 23, 24))):
        flex = _rot("x", p[f"f_{side}"])
        upper = trunk @ flex @ _rot("z", sign * p[f"a_{side}"])
        fore = trunk @ flex @ _rot("z", sign * (p[f"a_{side}"] + p[f"ea_{side}"])) \
            @ _rot("x", p[f"e_{side}"])
        u, v, n = _apply(upper, _DOWN), _apply(fore, _DOWN), _apply(fore, _FORWARD)
        j[:, sh] = _apply(trunk, np.array([sign * _SHOULDER_X, _SHOULDER_Y, 0.0]) * scale)
        j[:, el] = j[:, sh] + _UPPER_ARM * scale * u
        j[:, wr] = j[:, el] + _FOREARM * scale * v
        j[:, ha] = j[:, wr] + _HAND * scale * v
        j[:, tip] = j[:, ha] + _HAND_TIP * scale * v
        j[:, th] = j[:, wr] + scale * (0.5 * _HAND * v + 0.04 * n)
    for side, sign, (hip, knee, ankle, foot) in (
            ("l", 1.0, (12, 13, 14, 15)), ("r", -1.0, (16, 17, 18, 19))):
        bend = p[f"h_{side}"] - p[f"k_{side}"]
        j[:, hip] = np.array([sign * _HIP_X, _HIP_Y, 0.0]) * scale
        j[:, knee] = j[:, hip] + _THIGH * scale * _apply(_rot("x", p[f"h_{side}"]), _DOWN)
        j[:, ankle] = j[:, knee] + _SHIN * scale * _apply(_rot("x", bend), _DOWN)
        j[:, foot] = j[:, ankle] + _FOOT * scale * _apply(_rot("x", bend + math.pi / 2), _DOWN)
    # Keep the lower ankle on the floor, then add the jump height.
    rest_ankle = (_HIP_Y - _THIGH - _SHIN) * scale
    drop = np.minimum(j[:, 14, 1], j[:, 18, 1]) - rest_ankle
    j[:, :, 1] -= (drop - p["lift"])[:, None]
    j = np.einsum("tij,tvj->tvi", _rot("y", p["yaw"]), j)
    j[:, :, 0] += p["x"][:, None]
    j[:, :, 2] += p["z"][:, None]
    return j


def _rise(phi):
    """0 -> 1 -> 0 over one period, smooth."""
    return 0.5 - 0.5 * np.cos(phi)


def _walk_legs(p, phi, amp):
    swing = math.radians(28) * amp * np.sin(phi)
    p["h_l"], p["h_r"] = swing, -swing
    p["k_l"] = math.radians(45) * amp * np.maximum(0, np.cos(phi))
    p["k_r"] = math.radians(45) * amp * np.maximum(0, -np.cos(phi))
    p["f_l"], p["f_r"] = -0.8 * swing, 0.8 * swing


def _motion(label: int, t: np.ndarray, speed: float, amp: float, phase: float
            ) -> list[dict[str, np.ndarray]]:
    """Pose parameters of every body of class ``label`` over normalised time ``t`` in [0, 1]."""
    p = _pose_params(t)
    deg = math.radians

    def phi(cycles):
        return 2 * math.pi * cycles * speed * t + phase

    name = MOTIONS[label][0]
    if name == "wave right hand":
        p["a_r"] = np.full_like(t, deg(125))
        p["e_r"] = np.full_like(t, deg(15))
        p["ea_r"] = deg(40) * amp * np.sin(phi(3))
    elif name == "raise both arms":
        raise_ = deg(150) * amp * _rise(phi(1.5))
        p["a_l"] = p["a_l"] + raise_
        p["a_r"] = p["a_r"] + raise_
    elif name == "squat":
        s = _rise(phi(1.5)) * amp
        p["h_l"] = p["h_r"] = deg(80) * s
        p["k_l"] = p["k_r"] = deg(130) * s
        p["f_l"] = p["f_r"] = deg(85) * s
        p["bow"] = deg(25) * s
    elif name == "kick with right leg":
        s = np.maximum(0, np.sin(phi(2))) ** 1.5 * amp
        p["h_r"] = deg(85) * s
        p["k_r"] = deg(60) * (1 - s) * (s > 0.05)
        p["a_l"] = p["a_r"] = np.full_like(t, deg(30))
        p["bow"] = -deg(10) * s
    elif name == "jump up":
        up = np.maximum(0, np.sin(phi(2.5)))
        crouch = np.maximum(0, -np.sin(phi(2.5)))
        p["lift"] = 0.28 * amp * up
        p["h_l"] = p["h_r"] = deg(35) * crouch
        p["k_l"] = p["k_r"] = deg(70) * crouch
        p["a_l"] = p["a_r"] = deg(20) + deg(110) * up * amp
    elif name == "walk towards each other":
        bodies = []
        for sign in (-1.0, 1.0):  # one walker from each side, both heading for the centre
            q = _pose_params(t)
            _walk_legs(q, phi(2.5) + (0 if sign < 0 else math.pi / 2), amp)
            q["x"] = sign * (0.85 - 0.6 * t)
            q["yaw"] = np.full_like(t, sign * deg(90))
            q["z"] = np.full_like(t, 0.15 * sign)
            bodies.append(q)
        return bodies
    elif name == "bow":
        s = _rise(phi(1.5)) * amp
        p["bow"] = deg(70) * s
        p["nod"] = deg(20) * s
    elif name == "turn around":
        p["yaw"] = 2 * math.pi * min(1.0, speed) * t + phase
        p["h_l"] = deg(12) * np.maximum(0, np.sin(phi(4)))
        p["h_r"] = deg(12) * np.maximum(0, -np.sin(phi(4)))
        p["a_l"] = p["a_r"] = np.full_like(t, deg(25))
    elif name == "clap hands":
        s = _rise(phi(4)) * amp
        p["f_l"] = p["f_r"] = np.full_like(t, deg(80))
        p["a_l"] = p["a_r"] = deg(-20) * s + deg(25) * (1 - s)
        p["e_l"] = p["e_r"] = deg(25) + deg(20) * s
    elif name == "punch forward":
        left = np.maximum(0, np.sin(phi(2))) * amp
        right = np.maximum(0, -np.sin(phi(2))) * amp
        p["f_l"] = deg(40) + deg(50) * left
        p["f_r"] = deg(40) + deg(50) * right
        p["e_l"] = deg(110) * (1 - left)
        p["e_r"] = deg(110) * (1 - right)
        p["a_l"] = p["a_r"] = np.full_like(t, deg(-10))
    elif name == "walk across":
        _walk_legs(p, phi(2.5), amp)
        p["x"] = -0.45 + 0.9 * t
        p["yaw"] = np.full_like(t, -deg(90))
    elif name == "bend to the side":
        s = np.sin(phi(1.5)) * amp
        p["roll"] = deg(35) * s
        p["a_l"] = p["a_r"] = np.full_like(t, deg(160))
        p["e_l"] = p["e_r"] = np.full_like(t, deg(20))
    else:  # pragma: no cover - MOTIONS and this table are edited together
        raise AssertionError(name)
    return [p]


def _camera_angle(camera: int) -> float:
    """Horizontal viewing angle of a camera id: 1 -> 0, 2 -> +45, 3 -> -45 degrees, ..."""
    base = {1: 0.0, 2: 45.0, 3: -45.0}.get(camera, 45.0 * (camera - 1))
    return math.radians(base)


# --------------------------------------------------------------------------- sample


def _subject_style(seed: int, subject: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, 0, subject])
    return dict(scale=rng.uniform(0.85, 1.12), speed=rng.uniform(0.85, 1.15),
                amp=rng.uniform(0.8, 1.05), phase=rng.uniform(0, 0.6))


def class_table(num_classes: int, objects: int = 1, motions: Sequence[int] | None = None
                ) -> list[tuple[str, int, int]]:
    """(name, motion index into ``MOTIONS``, object index into ``OBJECTS``) of each class:
    class k is motion ``motions[k // objects]`` (default: the table's order) holding object
    ``k % objects``."""
    if not 1 <= objects <= len(OBJECTS):
        raise ValueError(f"objects must be in 1..{len(OBJECTS)}, got {objects}")
    motions = list(range(MAX_CLASSES)) if motions is None else list(motions)
    if not 2 <= num_classes <= len(motions) * objects:
        raise ValueError(f"num_classes must be in 2..{len(motions) * objects} with objects={objects}, "
                         f"got {num_classes}")
    out = []
    for k in range(num_classes):
        motion, obj = motions[k // objects], k % objects
        out.append((MOTIONS[motion][0] + (f" {OBJECTS[obj]}" if obj else ""), motion, obj))
    return out


def _sample_skeletons(sid: SampleId, frames: int, seed: int, rng: np.random.Generator,
                      motion: int | None = None) -> list[np.ndarray]:
    """Camera-space joints (T, 25, 3) in metres of every body in the sample (of motion
    ``motion``, by default the sample's label)."""
    style = _subject_style(seed, sid.performer)
    t = np.linspace(0.0, 1.0, frames)
    speed = style["speed"] * rng.uniform(0.95, 1.05)
    amp = style["amp"] * rng.uniform(0.95, 1.05)
    phase = style["phase"] + rng.uniform(-0.3, 0.3)
    # The two replications face slightly different directions, as in the real recordings.
    facing = math.radians(15 if sid.replication % 2 else -15) + rng.uniform(-0.15, 0.15)
    view = _rot("y", np.full(frames, _camera_angle(sid.camera) + facing))
    depth = 3.2 + rng.uniform(-0.2, 0.2)
    offset = np.array([rng.uniform(-0.05, 0.05), 0.0, depth])
    bodies = []
    for k, params in enumerate(_motion(sid.label if motion is None else motion, t, speed, amp, phase)):
        scale = style["scale"] if k == 0 else 2.0 - style["scale"]  # partner differs in size
        joints = _forward_kinematics(params, scale)
        joints = np.einsum("tij,tvj->tvi", view, joints) + offset
        joints += rng.normal(0.0, 0.006, joints.shape)  # sensor jitter (~6 mm)
        bodies.append(joints)
    return bodies


def _skeleton_text(bodies: list[np.ndarray], frames: int, rng: np.random.Generator) -> str:
    """A ``.skeleton`` file with every field: 10-field body lines, 25 x 12-field joints."""
    out = [str(frames)]
    ids = [72057594037927936 + int(rng.integers(1, 10**6)) for _ in bodies]
    for f in range(frames):
        out.append(str(len(bodies)))
        for body_id, joints in zip(ids, bodies):
            xyz = joints[f]
            spine = xyz[20] - xyz[0]
            lean_x = float(np.clip(spine[0] / (np.linalg.norm(spine) + 1e-9), -1, 1))
            lean_y = float(np.clip(-spine[2] / (np.linalg.norm(spine) + 1e-9), -1, 1))
            out.append(f"{body_id} 0 1 1 1 1 0 {lean_x:.7g} {lean_y:.7g} 2")
            out.append(str(JOINTS))
            x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
            depth_x = _DEPTH_C[0] + _DEPTH_F * x / z
            depth_y = _DEPTH_C[1] - _DEPTH_F * y / z
            color_x = _COLOR_C[0] + _COLOR_F * x / z
            color_y = _COLOR_C[1] - _COLOR_F * y / z
            # Body yaw as a quaternion about the vertical axis (hips give the heading).
            hips = xyz[16] - xyz[12]
            yaw = math.atan2(-hips[2], -hips[0])
            quat = (math.cos(yaw / 2), 0.0, math.sin(yaw / 2), 0.0)
            for v in range(JOINTS):
                q = (0.0, 0.0, 0.0, 0.0) if v in _NO_ORIENTATION else quat
                out.append(
                    f"{x[v]:.7g} {y[v]:.7g} {z[v]:.7g} {depth_x[v]:.7g} {depth_y[v]:.7g} "
                    f"{color_x[v]:.7g} {color_y[v]:.7g} {q[0]:.7g} {q[1]:.7g} {q[2]:.7g} "
                    f"{q[3]:.7g} 2")
    return "\n".join(out) + "\n"


def _empty_skeleton_text(frames: int) -> str:
    """What the 302 NTU samples without skeletons look like: every frame has 0 bodies."""
    return "\n".join([str(frames)] + ["0"] * frames) + "\n"


# --------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, frames: int, w: int, h: int, clutter: float = 1.0
                ) -> Callable[[int, int], np.ndarray]:
    """A cluttered, changing background: returns ``paint(f0, f1)`` giving frames f0..f1-1
    as float32 (n, h, w, 3) in 0..255. Painting in chunks bounds memory for large sizes;
    the random layout is drawn here, once, and the noise in call order (deterministic).
    ``clutter`` scales the texture and blobs' contrast around a mid grey (0: a flat grey
    wall with sensor noise); the random draws are the same whatever its value."""
    pad = max(4, h // 6)
    grid = rng.uniform(40, 170, (1, 3, 5, 7)).astype(np.float32)
    grey = grid.mean(axis=1, keepdims=True)
    grid = 0.5 * grid + 0.5 * grey  # muted colours so the figure stays the salient object
    texture = F.interpolate(torch.from_numpy(grid), size=(h + 2 * pad, w + 2 * pad),
                            mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    # The texture drifts slowly (a camera-shake-like pan) ...
    t = np.arange(frames)
    ox, oy = (np.round(pad + pad * 0.9 * np.sin(2 * np.pi * t / frames * rng.uniform(0.5, 1.5)
                                                + rng.uniform(0, 6.3))).astype(int)
              for _ in range(2))
    # ... under blobs of random colours moving in straight lines ...
    blobs = [(rng.uniform(0, w), rng.uniform(0, h),
              *(rng.uniform(-1.0, 1.0, 2) * (min(w, h) / frames)),
              rng.uniform(0.05, 0.14) * h, rng.uniform(30, 230, 3).astype(np.float32))
             for _ in range(6)]
    yy = np.arange(h, dtype=np.float32)[None, :, None]
    xx = np.arange(w, dtype=np.float32)[None, None, :]

    def paint(f0: int, f1: int) -> np.ndarray:
        bg = np.stack([texture[oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(f0, f1)])
        tt = t[f0:f1].astype(np.float32)[:, None, None]
        for x0, y0, vx, vy, radius, colour in blobs:
            dist = np.sqrt((xx - (x0 + vx * tt)) ** 2 + (yy - (y0 + vy * tt)) ** 2)
            alpha = np.clip(radius - dist, 0.0, 0.8)[..., None]
            bg += alpha * (colour - bg)
        if clutter != 1.0:
            bg = _GREY + np.float32(clutter) * (bg - _GREY)
        # ... plus sensor noise.
        bg += rng.standard_normal(bg.shape, dtype=np.float32) * 6.0
        return bg

    return paint


def _draw_figure(img: np.ndarray, uv: np.ndarray, depth: np.ndarray, focal: float,
                 colour: np.ndarray) -> None:
    """Draw one stick figure into ``img`` (T, h, w, 3) in place.

    ``uv`` (T, 25, 2) pixel coordinates, ``depth`` (T,) metres. Limbs are capsules of
    radius 7 cm and the head a disc of 11 cm (scaled by depth), with a dark outline and
    anti-aliased edges so the figure survives downscaling.
    """
    frames, h, w, _ = img.shape
    limb = (focal * 0.07 / depth).astype(np.float32)  # (T,) pixels
    head = (focal * 0.11 / depth).astype(np.float32)
    margin = float(head.max()) + 3
    x0 = int(max(0, math.floor(uv[..., 0].min() - margin)))
    x1 = int(min(w, math.ceil(uv[..., 0].max() + margin)))
    y0 = int(max(0, math.floor(uv[..., 1].min() - margin)))
    y1 = int(min(h, math.ceil(uv[..., 1].max() + margin)))
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    px, py = xx.ravel()[None, None], yy.ravel()[None, None]  # (1, 1, P)
    uv = uv.astype(np.float32)
    child = [b[0] for b in BONES]
    parent = [b[1] for b in BONES]
    ax, ay = uv[:, child, 0, None], uv[:, child, 1, None]  # (T, B, 1)
    dx, dy = uv[:, parent, 0, None] - ax, uv[:, parent, 1, None] - ay
    dd = np.maximum(dx * dx + dy * dy, 1e-6)
    # Frames in chunks so the (chunk, bones, pixels) temporaries stay around 2M floats.
    chunk = max(1, 2_000_000 // (len(BONES) * px.size))
    for f0 in range(0, frames, chunk):
        sl = slice(f0, f0 + chunk)
        rx, ry = px - ax[sl], py - ay[sl]
        s = np.clip((rx * dx[sl] + ry * dy[sl]) / dd[sl], 0.0, 1.0)
        rx -= s * dx[sl]
        ry -= s * dy[sl]
        dist = np.sqrt((rx * rx + ry * ry).min(axis=1))  # (chunk, P) to the nearest bone
        hx, hy = px[0] - uv[sl, 3, 0, None], py[0] - uv[sl, 3, 1, None]
        head_dist = np.sqrt(hx * hx + hy * hy) - (head[sl] - limb[sl])[:, None]
        dist = np.minimum(dist, head_dist).reshape(-1, y1 - y0, x1 - x0, 1)
        r = limb[sl, None, None, None]
        outline = np.clip(r + 1.5 - dist, 0.0, 1.0)
        fill = np.clip(r + 0.5 - dist, 0.0, 1.0)
        region = img[sl, y0:y1, x0:x1]
        region += outline * (0.2 * colour - region)
        region += fill * (colour - region)


def _project(points: np.ndarray, w: int, h: int) -> np.ndarray:
    """Pixel coordinates (..., 2) of camera-space points (..., 3) in a w × h frame."""
    focal = 1.1 * h
    centre_y = -0.08  # look slightly below the hips so head and feet both fit
    z = np.maximum(points[..., 2], 0.5)
    return np.stack([w / 2 + focal * points[..., 0] / z, h / 2 - focal * (points[..., 1] - centre_y) / z], axis=-1)


def _held_object(joints: np.ndarray, kind: np.ndarray, w: int, h: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Capsules (start uv, end uv, radius px), each (T, ...), of what the right hand holds:
    ``kind`` (T,) indexes ``OBJECTS``. A stick continues the forearm from the hand; a ball
    sits just beyond the hand tip. Frames with an empty hand get radius 0 (not drawn)."""
    hand, elbow, tip = joints[:, 11], joints[:, 9], joints[:, 23]
    along = hand - elbow
    along /= np.maximum(np.linalg.norm(along, axis=1, keepdims=True), 1e-6)
    stick = kind == 1
    start = np.where(stick[:, None], hand, tip + _BALL_RADIUS * along)
    end = np.where(stick[:, None], hand + _STICK_LENGTH * along, start)
    radius_m = np.select([kind == 1, kind == 2], [_STICK_RADIUS, _BALL_RADIUS], 0.0)
    depth = np.maximum(start[:, 2], 0.5)
    return _project(start, w, h), _project(end, w, h), (1.1 * h * radius_m / depth).astype(np.float32)


def _draw_capsules(img: np.ndarray, start: np.ndarray, end: np.ndarray, radius: np.ndarray,
                   colour: np.ndarray) -> None:
    """Draw one capsule per frame into ``img`` (T, h, w, 3): segment ``start``..``end``
    (T, 2) pixels with ``radius`` (T,) pixels, outlined and anti-aliased like the limbs."""
    frames, h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for f in range(frames):
        if radius[f] <= 0:
            continue
        (ax, ay), (bx, by) = start[f], end[f]
        dx, dy = bx - ax, by - ay
        s = np.clip(((xx - ax) * dx + (yy - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        dist = np.hypot(xx - ax - s * dx, yy - ay - s * dy)[..., None]
        outline = np.clip(radius[f] + 1.5 - dist, 0.0, 1.0)
        fill = np.clip(radius[f] + 0.5 - dist, 0.0, 1.0)
        img[f] += outline * (0.2 * colour - img[f])
        img[f] += fill * (colour - img[f])


def _render(bodies: list[np.ndarray], w: int, h: int, colour: np.ndarray,
            rng: np.random.Generator, held: np.ndarray | None = None,
            held_colour: np.ndarray | None = None, clutter: float = 1.0) -> Iterator[np.ndarray]:
    """Yield the RGB frames (h, w, 3) uint8 of the given camera-space skeletons.

    ``held`` (T,) indexes ``OBJECTS``: what the first body holds in its right hand in each
    frame, drawn in ``held_colour``."""
    frames = bodies[0].shape[0]
    paint = _background(rng, frames, w, h, clutter)
    focal = 1.1 * h
    figures = []
    # Paint the farther body first so the nearer one occludes it.
    for k, joints in sorted(enumerate(bodies), key=lambda kj: -float(kj[1][..., 2].mean())):
        obj = _held_object(joints, held, w, h) if k == 0 and held is not None and held.any() else None
        figures.append((_project(joints, w, h), joints[..., 2].mean(axis=1), obj))
    chunk = max(1, 4_000_000 // (h * w * 3))  # frames per chunk: ~16 MB of float32
    for f0 in range(0, frames, chunk):
        f1 = min(frames, f0 + chunk)
        img = paint(f0, f1)
        for uv, depth, obj in figures:
            _draw_figure(img, uv[f0:f1], depth[f0:f1], focal, colour)
            if obj is not None:
                _draw_capsules(img, obj[0][f0:f1], obj[1][f0:f1], obj[2][f0:f1], held_colour)
        yield from np.clip(img, 0, 255).astype(np.uint8)


def _write_video(path: Path, clip: Iterable[np.ndarray], w: int, h: int, container_format: str = "avi") -> None:
    """Encode (h, w, 3) uint8 frames as MPEG-4 Part 2 in AVI (the release's codec family).

    Written under a temporary name and renamed, so an interrupted run leaves no
    truncated video that would later fail to decode."""
    tmp = path.with_name(path.name + ".part")
    try:
        with av.open(str(tmp), mode="w", format=container_format) as container:
            stream = container.add_stream("mpeg4", rate=FPS)
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = max(400_000, w * h * FPS * 2)  # high enough to keep thin limbs
            for rgb in clip:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the encoder
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- public


def synthesize(root: str | os.PathLike, num_classes: int = 6,
               subjects: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), cameras: Sequence[int] = (1, 2, 3),
               replications: Sequence[int] = (1, 2), frames: int = 48,
               video_size: tuple[int, int] = (96, 72), seed: int = 0,
               progress: Callable[[int, int], None] | None = None,
               empty_sample: bool = False, objects: int = 1, clutter: float = 1.0) -> dict:
    """Write a synthetic dataset in the NTU RGB+D layout under ``root``; return a summary.

    One sample per (subject, camera, replication, class): ``SsssCcccPpppRrrrAaaa`` with
    setup 1 and action = class + 1. ``video_size`` is (width, height), both even.
    The result is a deterministic function of the arguments (``seed`` included).

    Subjects 1, 2, 4, 5, 8 are X-Sub training subjects and 3, 6, 7 are not, so the default gives both
    X-Sub splits; cameras 2, 3 train and 1 tests under X-View.

    ``empty_sample=True`` adds one extra sample (first subject and camera, replication
    one past the largest, action 1) whose video is normal but whose ``.skeleton`` file has
    no body in any frame, like the 302 such samples of the real release.

    ``objects`` > 1 makes each motion n classes that differ only in what the right hand
    holds (``OBJECTS``; see ``class_table``), which only the video shows: the skeleton
    alone cannot tell them apart, the video has to.

    ``clutter`` (0..1) is the background's contrast: 1, the default, is the cluttered moving
    scene; 0 a flat grey wall with sensor noise. With a few hundred training clips a 3-D CNN
    memorises full clutter (the reproduce set: 98 % training, 31 % test accuracy for RGB
    alone), so ``reproduce`` uses 0.

    ``progress(done, total)`` is called after each sample.
    Returns ``{"root", "num_samples", "num_classes", "class_names", "subjects", "cameras",
    "replications", "frames", "video_size", "two_body_classes", "empty_samples", "seed",
    "seconds"}``.
    """
    started = time.perf_counter()
    table = class_table(num_classes, objects)
    for label, values in (("subjects", subjects), ("cameras", cameras),
                          ("replications", replications)):
        if not values or any(not 1 <= int(v) <= 999 for v in values):
            raise ValueError(f"{label} must be a non-empty list of integers in 1..999")
        if len(set(values)) != len(values):
            raise ValueError(f"{label} must not repeat values")
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    if not 0.0 <= clutter <= 1.0:
        raise ValueError(f"clutter must be in 0..1, got {clutter}")
    width, height = (int(v) for v in video_size)
    if not (16 <= width <= 4096 and 16 <= height <= 4096) or width % 2 or height % 2:
        raise ValueError(f"video_size must be even and in 16..4096, got {video_size}")

    root = Path(root)
    skel_dir, rgb_dir = root / SKELETON_DIR, root / RGB_DIR
    skel_dir.mkdir(parents=True, exist_ok=True)
    rgb_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name, _, _ in table]
    (root / CLASSES_FILE).write_text("\n".join(names) + "\n", encoding="utf-8")

    ids = [SampleId(SETUP, int(c), int(s), int(r), k + 1)
           for s in subjects for c in cameras for r in replications
           for k in range(num_classes)]
    empty_ids = []
    if empty_sample:
        empty_ids.append(SampleId(SETUP, int(cameras[0]), int(subjects[0]),
                                  max(int(r) for r in replications) + 1, 1))
    total = len(ids) + len(empty_ids)
    for done, sid in enumerate(ids + empty_ids, start=1):
        rng = np.random.default_rng([seed, 1, sid.setup, sid.camera, sid.performer,
                                     sid.replication, sid.action])
        _, motion, obj = table[sid.label]
        bodies = _sample_skeletons(sid, frames, seed, rng, motion)
        colour = _PALETTE[rng.integers(len(_PALETTE))]  # per sample, never per class
        text = (_empty_skeleton_text(frames) if sid in empty_ids
                else _skeleton_text(bodies, frames, rng))
        _write_text(skel_dir / f"{sid.name}{SKELETON_SUFFIX}", text)
        held = held_colour = None
        if obj:
            held = np.full(frames, obj)
            held_colour = _PALETTE[(int(np.flatnonzero((_PALETTE == colour).all(axis=1))[0])
                                    + 1 + rng.integers(len(_PALETTE) - 1)) % len(_PALETTE)]
        _write_video(rgb_dir / f"{sid.name}{VIDEO_SUFFIX}",
                     _render(bodies, width, height, colour, rng, held, held_colour, clutter), width, height)
        if progress is not None:
            progress(done, total)
    return {
        "root": str(root),
        "num_samples": total,
        "num_classes": num_classes,
        "class_names": names,
        "subjects": [int(s) for s in subjects],
        "cameras": [int(c) for c in cameras],
        "replications": [int(r) for r in replications],
        "frames": frames,
        "video_size": [width, height],
        "two_body_classes": [name for name, motion, _ in table if MOTIONS[motion][1] > 1],
        "objects": objects,
        "clutter": clutter,
        "empty_samples": [sid.name for sid in empty_ids],
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 3),
    }
