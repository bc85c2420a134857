"""Tests of the NTU reader, the synthetic dataset writer and the cache (models/data)."""

from __future__ import annotations

import ast
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from robustact.models.data import cache, ntu, synth
from robustact.models.data.cache import ClipDataset, SkippedSampleWarning, prepare
from robustact.models.data.ntu import (NTU60_CLASSES, EmptySkeletonError, SampleId, SkeletonFormatError,
                             VideoDecodeError, in_train_split, parse_sample_name,
                             read_skeleton_file, read_skeleton_text, read_video,
                             read_video_bytes, resample_skeleton, scale_skeleton)
from robustact.models.data.synth import synthesize

# Small synthetic dataset shared by the module: 6 classes (class 6 has two bodies),
# subject 1 is an X-Sub training subject and 3 is not; camera 2 trains under X-View, 1 tests.
SYN = dict(num_classes=6, subjects=(1, 3), cameras=(1, 2), replications=(1,), frames=12,
           video_size=(48, 36), seed=3)
RGB_FRAMES, RGB_SIZE, SKEL_FRAMES = 4, 16, 8


# --------------------------------------------------------------------------- helpers


def skeleton_text(frames) -> str:
    """A .skeleton text; ``frames`` is a list (per frame) of lists of (bodyID, (25, 3) xyz)."""
    lines = [str(len(frames))]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, xyz in bodies:
            lines.append(f"{body_id} 0 1 1 1 1 0 0.01 -0.02 2")
            lines.append("25")
            for x, y, z in xyz:
                lines.append(f"{x:.6f} {y:.6f} {z:.6f} 250.1 200.2 960.3 540.4 "
                             "0.1 0.2 0.3 0.4 2")
    return "\n".join(lines) + "\n"


def pose(rng, offset=0.0, motion=0.0, frames=4):
    """(frames, 25, 3) joints around ``offset`` that move with amplitude ``motion``."""
    base = rng.uniform(-0.5, 0.5, (25, 3)) + np.array([offset, 0.0, 3.0])
    wiggle = motion * np.sin(np.arange(frames))[:, None, None]
    return base[None] + wiggle * np.ones((1, 25, 3))


def joint_line(frame: int, joint: int) -> int:
    """1-based line number of a joint in a one-body-per-frame text."""
    return 2 + 28 * frame + 3 + joint


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ntu") / "root"
    calls = []
    summary = synthesize(root, **SYN, empty_sample=True,
                         progress=lambda done, total: calls.append((done, total)))
    return root, summary, calls


@pytest.fixture(scope="module")
def prepared(syn_root, tmp_path_factory):
    root, _, _ = syn_root
    cache_dir = tmp_path_factory.mktemp("cache") / "c"
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prepare(root, cache_dir, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES,
                          progress=lambda done, total: calls.append((done, total)))
    meta = cache.load_meta(cache_dir)
    assert summary == {**{k: v for k, v in meta.items() if k != "samples"},
                       "cache_dir": str(cache_dir)}
    return cache_dir, meta, caught, calls


# --------------------------------------------------------------------------- names, splits


def test_parse_sample_name_accepts_real_file_names():
    sid = parse_sample_name("S001C002P003R002A013")
    assert sid == SampleId(setup=1, camera=2, performer=3, replication=2, action=13)
    assert sid.label == 12 and sid.subject == 3
    assert sid.name == "S001C002P003R002A013"
    for name in ("S001C002P003R002A013.skeleton", "S001C002P003R002A013_rgb.avi",
                 "/data/nturgb+d_rgb/S001C002P003R002A013_rgb.avi",
                 Path("x/S001C002P003R002A013.skeleton")):
        assert parse_sample_name(name) == sid
    assert parse_sample_name("S017C003P040R001A060").label == 59


@pytest.mark.parametrize("bad", ["", "S01C002P003R002A013", "foo.skeleton",
                                 "S001C002P003R002A013_depth.avi", "s001c002p003r002a013",
                                 "S001C002P003R002A000", "S001C002P003R002A0134"])
def test_parse_sample_name_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="S"):
        parse_sample_name(bad)


def test_splits_and_class_names():
    def sid(performer=1, camera=1):
        return SampleId(1, camera, performer, 1, 1)

    assert ntu.XSUB_TRAIN_SUBJECTS == (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27,
                                       28, 31, 34, 35, 38)
    for p in (1, 2, 4, 38):
        assert in_train_split(sid(performer=p), "xsub")
    for p in (3, 6, 7, 39, 40):
        assert not in_train_split(sid(performer=p), "xsub")
    assert in_train_split(sid(camera=2), "xview") and in_train_split(sid(camera=3), "xview")
    assert not in_train_split(sid(camera=1), "xview")
    with pytest.raises(ValueError, match="protocol"):
        in_train_split(sid(), "xset")
    assert len(NTU60_CLASSES) == 60 and len(set(NTU60_CLASSES)) == 60
    assert NTU60_CLASSES[0] == "drink water" and NTU60_CLASSES[22] == "hand waving"
    assert NTU60_CLASSES[59] == "walking apart from each other"


# --------------------------------------------------------------------------- .skeleton


def test_skeleton_one_body_and_absence():
    rng = np.random.default_rng(0)
    a = pose(rng, motion=0.1)
    text = skeleton_text([[(7, a[0])], [], [(7, a[2])], [(7, a[3])]])
    out = read_skeleton_text(text, "one.skeleton")
    assert out.shape == (4, 25, 3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[[0, 2, 3], :, :, 0], a[[0, 2, 3]], atol=1e-5)
    assert not out[1].any() and not out[..., 1].any()


def test_skeleton_two_most_active_of_three_bodies_kept():
    rng = np.random.default_rng(1)
    still, busy, medium = pose(rng, -1), pose(rng, 0, motion=0.3), pose(rng, 1, motion=0.1)
    # The busy body appears last in each frame and only from frame 1 on.
    frames = [[(11, still[0]), (22, medium[0])]]
    frames += [[(11, still[f]), (22, medium[f]), (33, busy[f])] for f in range(1, 4)]
    out = read_skeleton_text(skeleton_text(frames), "three.skeleton")
    np.testing.assert_allclose(out[1:, :, :, 0], busy[1:], atol=1e-5)  # most active first
    assert not out[0, :, :, 0].any()  # absent in frame 0
    np.testing.assert_allclose(out[..., 1], medium, atol=1e-5)


def test_skeleton_equal_activity_keeps_first_seen_order():
    rng = np.random.default_rng(2)
    a, b = pose(rng, -1), pose(rng, 1)
    out = read_skeleton_text(skeleton_text([[(5, a[f]), (4, b[f])] for f in range(4)]), "x")
    np.testing.assert_allclose(out[..., 0], a, atol=1e-5)
    np.testing.assert_allclose(out[..., 1], b, atol=1e-5)


@pytest.mark.parametrize("text", ["3\n0\n0\n0\n", "0\n"])
def test_skeleton_without_bodies_is_empty_error(tmp_path, text):
    path = tmp_path / "S001C001P001R001A001.skeleton"
    path.write_text(text)
    with pytest.raises(EmptySkeletonError, match="S001C001P001R001A001.skeleton") as info:
        read_skeleton_file(path)
    assert isinstance(info.value, SkeletonFormatError)


def _two_frame_lines():
    rng = np.random.default_rng(3)
    a = pose(rng, motion=0.1, frames=2)
    return skeleton_text([[(9, a[0])], [(9, a[1])]]).splitlines()


def _set_field(lines, line_no, index, value):
    tokens = lines[line_no - 1].split()
    tokens[index] = value
    lines[line_no - 1] = " ".join(tokens)


def _malformed(case):
    lines = _two_frame_lines()  # 57 lines
    if case == "bad token":
        line = joint_line(1, 2)
        _set_field(lines, line, 1, "abc")
        return lines, line, "not a number"
    if case == "truncated":
        return lines[:40], 41, "end of file"
    if case == "joint count":
        lines[3] = "24"
        return lines, 4, "joint count must be 25"
    if case == "missing field":
        line = joint_line(0, 5)
        lines[line - 1] = " ".join(lines[line - 1].split()[:11])
        return lines, line, "12 fields"
    if case == "body line":
        lines[2] = " ".join(lines[2].split()[:9])
        return lines, 3, "body info"
    if case == "frame count":
        lines[0] = "two"
        return lines, 1, "integer"
    if case == "body id":
        _set_field(lines, 3 + 28, 0, "1.5")
        return lines, 31, "bodyID"
    if case == "trailing data":
        return lines + ["1 2 3"], 58, "after the last"
    if case == "nan xyz":
        _set_field(lines, joint_line(0, 0), 2, "nan")
        return lines, joint_line(0, 0), "finite"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["bad token", "truncated", "joint count", "missing field",
                                  "body line", "frame count", "body id", "trailing data",
                                  "nan xyz"])
def test_malformed_skeleton_names_file_and_line(tmp_path, case):
    lines, line_no, message = _malformed(case)
    path = tmp_path / "S001C001P001R001A001.skeleton"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SkeletonFormatError) as info:
        read_skeleton_file(path)
    err = info.value
    assert not isinstance(err, EmptySkeletonError)
    assert err.line_no == line_no and err.path == str(path)
    assert str(path) in str(err) and f"line {line_no}" in str(err)
    assert message in str(err)
    # The upload entry point reports the upload's name instead of a path.
    with pytest.raises(SkeletonFormatError, match=f"upload.skeleton: line {line_no}"):
        read_skeleton_text("\n".join(lines), "upload.skeleton")


def test_skeleton_frame_limit_refuses_from_the_first_line(tmp_path):
    rng = np.random.default_rng(0)
    text = skeleton_text([[(1, pose(rng, frames=1)[0])]] * 3)
    assert read_skeleton_text(text, "ok.skeleton", max_frames=3).shape == (3, 25, 3, 2)
    with pytest.raises(SkeletonFormatError, match="ok.skeleton: line 1: 3 frames is above the 2-frame limit"):
        read_skeleton_text(text, "ok.skeleton", max_frames=2)
    path = tmp_path / "S001C001P001R001A001.skeleton"
    path.write_text(text)
    with pytest.raises(SkeletonFormatError, match="3 frames is above the 2-frame limit"):
        read_skeleton_file(path, max_frames=2)
    # A bomb: one real frame, then two million empty ones (6 MB of CRLF text, declared
    # honestly). Refused from its first line, without parsing the rest.
    bomb = "\r\n".join(["2000001", *text.splitlines()[1:29]] + ["0"] * 2_000_000) + "\r\n"
    started = time.perf_counter()
    with pytest.raises(SkeletonFormatError, match="line 1: 2000001 frames is above the 10000-frame limit"):
        read_skeleton_text(bomb, "bomb.skeleton", max_frames=10000)
    assert time.perf_counter() - started < 0.05
    # A first line that is not one integer is left to the parser, which names the problem.
    with pytest.raises(SkeletonFormatError, match="line 1: expected frame count"):
        read_skeleton_text("3 frames\n" + text.split("\n", 1)[1], "x", max_frames=2)


# --------------------------------------------------------------------------- array ops


def test_resample_skeleton_linear_and_shapes():
    arr = np.zeros((2, 25, 3, 2), np.float32)
    arr[0, ..., 0], arr[1, ..., 0] = 1.0, 3.0
    up = resample_skeleton(arr, 5)
    assert up.shape == (5, 25, 3, 2) and up.dtype == np.float32
    np.testing.assert_allclose(up[:, 0, 0, 0], [1.0, 1.5, 2.0, 2.5, 3.0])
    assert not up[..., 1].any()
    np.testing.assert_array_equal(resample_skeleton(up, 5), up)  # identity at equal length
    down = resample_skeleton(np.arange(10, dtype=np.float32)[:, None, None, None]
                             * np.ones((10, 25, 3, 2), np.float32), 4)
    np.testing.assert_allclose(down[:, 0, 0, 0], [0, 3, 6, 9])  # first and last kept
    one = resample_skeleton(arr[:1], 7)
    assert one.shape == (7, 25, 3, 2) and (one[..., 0] == 1.0).all()
    assert resample_skeleton(arr, 1).shape == (1, 25, 3, 2)
    with pytest.raises(ValueError):
        resample_skeleton(arr, 0)


def test_resample_never_blends_a_body_with_absence():
    arr = np.zeros((4, 25, 3, 2), np.float32)
    arr[:2, ..., 1] = 2.0  # body 1 present in frames 0-1 only
    out = resample_skeleton(arr, 7)
    values = np.unique(out[..., 1])
    assert set(values.tolist()) <= {0.0, 2.0}
    assert out[0, ..., 1].all() and not out[-1, ..., 1].any()


def test_scale_skeleton_range_and_absent_bodies():
    rng = np.random.default_rng(4)
    arr = rng.uniform(-2, 2, (6, 25, 3, 2)).astype(np.float32)
    arr[2, ..., 1] = 0.0  # body 1 absent in frame 2
    lo, hi = [-1.0, -1.5, -2.0], [1.0, 1.5, 2.0]
    out = scale_skeleton(arr, lo, hi)
    assert out.shape == arr.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not out[2, ..., 1].any()
    inside = (np.abs(arr[..., 0, :]) < 1.0) & (arr[..., 0, :] != 0)  # x of present bodies
    np.testing.assert_allclose(out[..., 0, :][inside], (arr[..., 0, :][inside] + 1) / 2,
                               atol=1e-6)
    edges = scale_skeleton(np.array(lo, np.float32).reshape(1, 1, 3, 1) * np.ones((1, 25, 3, 2)),
                           lo, hi)
    assert (edges == 0).all()


# --------------------------------------------------------------------------- synth


def test_synth_writes_the_ntu_layout(syn_root):
    root, summary, calls = syn_root
    expected = {SampleId(1, c, s, r, a).name for s in SYN["subjects"] for c in SYN["cameras"]
                for r in SYN["replications"] for a in range(1, SYN["num_classes"] + 1)}
    expected.add("S001C001P001R002A001")  # the extra sample without bodies
    skel_dir, rgb_dir = root / "nturgb+d_skeletons", root / "nturgb+d_rgb"
    assert {p.name for p in skel_dir.iterdir()} == {f"{n}.skeleton" for n in expected}
    assert {p.name for p in rgb_dir.iterdir()} == {f"{n}_rgb.avi" for n in expected}
    names = (root / "classes.txt").read_text().splitlines()
    assert names == summary["class_names"] and len(names) == SYN["num_classes"]
    assert ntu.class_names(root) == names
    assert summary["num_samples"] == len(expected)
    assert summary["empty_samples"] == ["S001C001P001R002A001"]
    assert calls[-1] == (len(expected), len(expected))
    assert [d for d, _ in calls] == list(range(1, len(expected) + 1))
    found = ntu.find_samples(root)
    assert [s.name for s in found] == sorted(expected)
    assert all(s.skeleton and s.video for s in found)


def test_synth_skeleton_files_have_every_field(syn_root):
    root, _, _ = syn_root
    lines = (root / "nturgb+d_skeletons" / "S001C002P003R001A006.skeleton").read_text().split("\n")
    assert lines[0] == str(SYN["frames"]) and lines[1] == "2"  # two bodies
    assert len(lines[2].split()) == 10 and lines[3] == "25"
    assert all(len(line.split()) == 12 for line in lines[4:29])


def test_synth_files_parse_back(syn_root):
    root, _, _ = syn_root
    for sample in ntu.find_samples(root):
        if sample.name == "S001C001P001R002A001":
            with pytest.raises(EmptySkeletonError):
                read_skeleton_file(sample.skeleton)
            continue
        arr = read_skeleton_file(sample.skeleton)
        assert arr.shape == (SYN["frames"], 25, 3, 2)
        two_bodies = sample.id.action == 6  # "walk towards each other"
        assert bool(arr[..., 1].any()) == two_bodies
        assert (arr[..., 0, 2, 0] > 1.0).all()  # in front of the camera, in metres


def test_synth_is_deterministic(syn_root, tmp_path):
    root, _, _ = syn_root
    synthesize(tmp_path, **{**SYN, "subjects": (3,), "cameras": (2,), "num_classes": 2})
    name = "S001C002P003R001A002.skeleton"
    assert (tmp_path / "nturgb+d_skeletons" / name).read_text() == \
        (root / "nturgb+d_skeletons" / name).read_text()


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        synthesize(tmp_path, num_classes=synth.MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="video_size"):
        synthesize(tmp_path, video_size=(49, 36))
    with pytest.raises(ValueError, match="subjects"):
        synthesize(tmp_path, subjects=())


# --------------------------------------------------------------------------- video


def test_synth_videos_decode(syn_root):
    root, _, _ = syn_root
    path = root / "nturgb+d_rgb" / "S001C001P003R001A002_rgb.avi"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "mpeg4"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == SYN["frames"] and frames[0].shape == (36, 48, 3)
    clip = read_video(path, RGB_FRAMES, RGB_SIZE)
    assert clip.shape == (3, RGB_FRAMES, RGB_SIZE, RGB_SIZE) and clip.dtype == np.uint8
    assert clip.std() > 10  # a real picture, not a flat frame
    np.testing.assert_array_equal(read_video_bytes(path.read_bytes(), RGB_FRAMES, RGB_SIZE,
                                                   name="up.avi"), clip)
    long = read_video(path, 30, 20)  # more frames than the clip: frames repeat
    assert long.shape == (3, 30, 20, 20)


def test_read_video_samples_uniformly_and_crops_the_centre(tmp_path):
    # 10 portrait frames (w=32, h=64), frame k a flat grey of 20*k, with a white band
    # at the top and bottom that the centre crop must remove.
    clip = np.zeros((10, 64, 32, 3), np.uint8)
    for k in range(10):
        clip[k] = 20 * k
    clip[:, :12] = 255
    clip[:, -12:] = 255
    path = tmp_path / "S001C001P001R001A001_rgb.avi"
    synth._write_video(path, clip, 32, 64)
    out = read_video(path, 4, 16)
    assert out.shape == (3, 4, 16, 16)
    means = out.reshape(3, 4, -1).mean(axis=(0, 2))
    np.testing.assert_allclose(means, [0, 60, 120, 180], atol=6)  # frames 0, 3, 6, 9
    # Matroska stores no frame count: the reader must count, then decode again.
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 64, "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with av.open(io.BytesIO(buffer.getvalue())) as container:
        assert container.streams.video[0].frames == 0
    upload = read_video_bytes(buffer.getvalue(), 4, 16, name="clip.mkv")
    np.testing.assert_allclose(upload.reshape(3, 4, -1).mean(axis=(0, 2)), means, atol=6)


def test_unreadable_videos_raise_naming_the_file(tmp_path):
    bad = tmp_path / "S001C001P001R001A001_rgb.avi"
    bad.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoDecodeError, match="S001C001P001R001A001_rgb.avi"):
        read_video(bad, 4, 16)
    with pytest.raises(VideoDecodeError, match="missing_rgb.avi"):
        read_video(tmp_path / "missing_rgb.avi", 4, 16)
    with pytest.raises(VideoDecodeError, match="clip.avi"):
        read_video_bytes(b"", 4, 16, name="clip.avi")


def _mp4(tmp_path, name, frames, width, height, container="mp4"):
    """A flat grey mpeg4 clip of ``frames`` frames, written with PyAV."""
    path = tmp_path / name
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        picture = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        for _ in range(frames):
            out.mux(stream.encode(picture))
        out.mux(stream.encode())
    return path


def test_probe_video_reads_the_header(tmp_path):
    info = ntu.probe_video(_mp4(tmp_path, "a.mp4", 50, 64, 32))
    assert (info.width, info.height, info.frames, info.codec) == (64, 32, 50, "mpeg4")
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    mkv = _mp4(tmp_path, "a.mkv", 5, 32, 32, container="matroska")
    with open(mkv, "rb") as upload:
        info = ntu.probe_video(upload, name="clip.mkv")
    assert info.frames == 0 and info.width == 32  # Matroska stores no frame count
    with pytest.raises(VideoDecodeError, match="clip.avi"):
        ntu.probe_video(io.BytesIO(b"not a video" * 50), name="clip.avi")


def test_read_video_limits_refuse_before_and_while_decoding(tmp_path):
    clip = _mp4(tmp_path, "a.mp4", 50, 64, 32)
    assert read_video(clip, 4, 16, max_frames=50, max_width=64, max_height=32, max_seconds=2.5).shape == \
        (3, 4, 16, 16)
    for limits, message in [
        (dict(max_width=48, max_height=48), "64x32 is above the 48x48 limit"),
        (dict(max_height=16), "64x32 is above the anyx16 limit"),
        (dict(max_frames=10), "50 frames is above the 10-frame limit"),
        (dict(max_seconds=1.0), "2.0 s is above the 1 s limit"),
    ]:
        with pytest.raises(ntu.VideoTooLargeError, match=message) as info:
            read_video(clip, 4, 16, name="up.mp4", **limits)
        assert isinstance(info.value, VideoDecodeError) and "up.mp4" in str(info.value)
    # Without a count in the header, decoding stops at the first frame past the limit.
    mkv = _mp4(tmp_path, "a.mkv", 30, 32, 32, container="matroska")
    with pytest.raises(ntu.VideoTooLargeError, match="more than 10 frames decoded; above the 10-frame limit"):
        read_video(mkv, 4, 16, max_frames=10)
    assert read_video(mkv, 4, 16, max_frames=30).shape == (3, 4, 16, 16)


# --------------------------------------------------------------------------- root scanning


def test_find_samples_errors_and_default_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nturgb"):
        ntu.find_samples(tmp_path)
    (tmp_path / "nturgb+d_skeletons").mkdir()
    (tmp_path / "nturgb+d_skeletons" / "S001C001P001R001A001.skeleton").write_text("0\n")
    (tmp_path / "nturgb+d_skeletons" / "notes.txt").write_text("ignored")
    (found,) = ntu.find_samples(tmp_path)
    assert found.video is None and found.name == "S001C001P001R001A001"
    assert ntu.class_names(tmp_path) == list(NTU60_CLASSES)
    (tmp_path / "nturgb+d_skeletons" / "bogus.skeleton").write_text("0\n")
    with pytest.raises(ValueError, match="bogus"):
        ntu.find_samples(tmp_path)


# --------------------------------------------------------------------------- cache


def test_prepare_writes_meta_and_arrays(prepared, syn_root):
    cache_dir, meta, caught, calls = prepared
    _, summary, _ = syn_root
    assert sorted(p.name for p in cache_dir.iterdir()) == ["clips", "labels.npy", "meta.json",
                                                          "prepare.json", "skel.npy"]
    assert json.loads((cache_dir / "meta.json").read_text()) == meta
    assert meta["format"] == cache.CACHE_FORMAT
    assert meta["class_names"] == summary["class_names"]
    n = summary["num_samples"] - 1
    assert meta["num_samples"] == n == len(meta["samples"])
    assert meta["skipped"][0]["name"] == "S001C001P001R002A001"
    assert meta["skel_range_source"] == "xsub-train"
    assert all(lo < hi for lo, hi in zip(meta["skel_min"], meta["skel_max"]))
    skipped = [w for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert len(skipped) == 1 and "S001C001P001R002A001" in str(skipped[0].message)
    assert calls[-1] == (2 * summary["num_samples"],) * 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert sorted(p.name for p in (cache_dir / "clips").iterdir()) == \
        sorted(f"{s['name']}.npz" for s in meta["samples"])
    rgb = np.stack([np.load(cache_dir / "clips" / f"{s['name']}.npz", allow_pickle=False)["rgb"]
                    for s in meta["samples"]])
    skel = np.load(cache_dir / "skel.npy", allow_pickle=False)
    labels = np.load(cache_dir / "labels.npy", allow_pickle=False)
    assert rgb.shape == (n, 3, RGB_FRAMES, RGB_SIZE, RGB_SIZE) and rgb.dtype == np.uint8
    assert skel.shape == (n, 3, SKEL_FRAMES, 25, 2) and skel.dtype == np.float32
    assert labels.dtype == np.int64
    assert [s["label"] for s in meta["samples"]] == labels.tolist()
    assert skel.min() >= 0 and skel.max() <= 1
    # No temporary directory is left next to the cache.
    assert [p.name for p in cache_dir.parent.iterdir()] == [cache_dir.name]


def test_clip_dataset_splits_and_items(prepared):
    cache_dir, meta, _, _ = prepared
    sizes = {}
    for protocol in ("xsub", "xview"):
        train = ClipDataset(cache_dir, protocol, "train")
        test = ClipDataset(cache_dir, protocol, "test")
        assert len(train) > 0 and len(test) > 0
        assert len(train) + len(test) == meta["num_samples"]
        assert not set(train.indices) & set(test.indices)
        sizes[protocol] = (len(train), len(test))
        assert meta["splits"][protocol] == {"train": len(train), "test": len(test)}
    assert sizes["xsub"] == (12, 12)  # subject 1 trains, subject 3 tests (empty one skipped)
    assert sizes["xview"] == (12, 12)  # camera 2 trains, camera 1 tests
    ds = ClipDataset(cache_dir, "xsub", "test")
    assert all(name[8:12] == "P003" for name in ds.sample_names)
    assert ds.class_names == meta["class_names"] and ds.num_classes == 6
    assert ds.skel_min == tuple(meta["skel_min"])
    rgb, skel, label = ds[0]
    assert rgb.dtype == torch.float32 and rgb.shape == (3, RGB_FRAMES, RGB_SIZE, RGB_SIZE)
    assert skel.dtype == torch.float32 and skel.shape == (3, SKEL_FRAMES, 25, 2)
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1 and float(rgb.max()) > 0.5
    assert 0 <= float(skel.min()) and float(skel.max()) <= 1
    assert isinstance(label, int) and label == int(ds.labels[0])
    for i in range(len(ds)):  # one-person classes have an all-zero second body
        assert bool(ds[i][1][..., 1].any()) == (ds.labels[i] == 5)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, RGB_FRAMES, RGB_SIZE, RGB_SIZE)
    sub = ds.subset(3, seed=0)
    assert len(sub) == 3 and len(set(sub.labels.tolist())) == 3
    assert len(ClipDataset(cache_dir, split="all")) == meta["num_samples"]
    with pytest.raises(ValueError, match="split"):
        ClipDataset(cache_dir, "xsub", "val")


def test_classes_are_separable(tmp_path):
    # A dataset with more subjects than the shared one: train on X-Sub subjects 1, 2, 4 and
    # classify subject 3 with nearest class means, from each modality alone.
    synthesize(tmp_path / "root", num_classes=6, subjects=(1, 2, 3, 4), cameras=(1, 2, 3),
               replications=(1,), frames=16, video_size=(48, 36), seed=0)
    prepare(tmp_path / "root", tmp_path / "cache", 6, 16, 8)
    train = ClipDataset(tmp_path / "cache", "xsub", "train")
    test = ClipDataset(tmp_path / "cache", "xsub", "test")

    def features(ds):
        items = [ds[i] for i in range(len(ds))]
        skel = torch.stack([s for _, s, _ in items]).flatten(1)
        rgb = torch.stack([r for r, _, _ in items])
        # RGB: where the picture changes over time (the figure's colour is random).
        motion = (rgb[:, :, 1:] - rgb[:, :, :-1]).abs().mean(dim=(1, 2)).flatten(1)
        return skel, motion

    (skel_tr, mot_tr), (skel_te, mot_te) = features(train), features(test)
    y_tr, y_te = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    for x_tr, x_te, floor in ((skel_tr, skel_te, 0.8), (mot_tr, mot_te, 0.5)):
        centroids = torch.stack([x_tr[y_tr == k].mean(0) for k in range(6)])
        gaps = torch.cdist(centroids, centroids)
        assert (gaps + torch.eye(6) * 1e9).min() > 0  # every class mean differs
        accuracy = (torch.cdist(x_te, centroids).argmin(1) == y_te).float().mean()
        assert accuracy >= floor  # chance is 1/6


def test_prepare_failure_leaves_no_cache(syn_root, prepared, tmp_path):
    root, _, _ = syn_root
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    target = broken / "nturgb+d_skeletons" / "S001C002P003R001A004.skeleton"
    lines = target.read_text().splitlines()
    lines[10] = lines[10].replace(lines[10].split()[0], "x1y", 1)
    target.write_text("\n".join(lines) + "\n")
    out = tmp_path / "caches"
    out.mkdir()
    with pytest.raises(SkeletonFormatError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        prepare(broken, out / "new", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)
    assert str(target) in str(info.value) and "line 11" in str(info.value)
    # Only the partial cache is left (kept for resuming), and nothing reads it as a cache.
    assert [p.name for p in out.iterdir()] == [".new.partial"]
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ClipDataset(out / ".new.partial")
    # An existing cache survives a failed re-prepare untouched.
    cache_dir, meta, _, _ = prepared
    existing = out / "existing"
    shutil.copytree(cache_dir, existing)
    with pytest.raises(SkeletonFormatError), warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        prepare(broken, existing, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)
    assert sorted(p.name for p in out.iterdir()) == [".existing.partial", ".new.partial", "existing"]
    assert cache.load_meta(existing) == meta
    assert cache.cache_digest(existing) == cache.cache_digest(cache_dir)


def test_prepare_refuses_to_replace_a_foreign_directory(syn_root, tmp_path):
    root, _, _ = syn_root
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        prepare(root, tmp_path, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def _quiet_prepare(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        return prepare(*args, **kwargs)


def test_prepare_with_two_workers_writes_the_same_cache(syn_root, prepared, tmp_path):
    root, _, _ = syn_root
    cache_dir, meta, _, _ = prepared
    one = _quiet_prepare(root, tmp_path / "one", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1)
    two = _quiet_prepare(root, tmp_path / "two", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=2)
    assert one["prepare"] == {"workers": 1, "decoded": meta["num_samples"], "reused": 0}
    assert two["prepare"] == {"workers": 2, "decoded": meta["num_samples"], "reused": 0}
    # Every array of every clip, skel.npy, labels.npy and the meta (but its run fields).
    digest = cache.cache_digest(cache_dir)
    assert cache.cache_digest(tmp_path / "one") == digest == cache.cache_digest(tmp_path / "two")
    assert {k: v for k, v in one.items() if k not in cache.RUN_KEYS + ("cache_dir",)} == \
        {k: v for k, v in meta.items() if k not in cache.RUN_KEYS + ("samples",)}
    with pytest.raises(ValueError, match="workers"):
        prepare(root, tmp_path / "zero", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=0)


def test_a_prepare_in_pieces_writes_the_same_cache(syn_root, prepared, tmp_path):
    """The service's sharded prepare: samples decoded in pieces (separate directories, as on
    separate machines), then the cache assembled from their skeleton arrays alone, is the
    cache ``prepare`` writes."""
    from robustact.models.data.ntu import find_samples

    root, _, _ = syn_root
    cache_dir, meta, _, _ = prepared
    names = [s.name for s in find_samples(root)]
    pieces = [names[0::3], names[1::3], names[2::3]]
    arrays, skipped, sizes = {}, {}, 0
    for k, piece in enumerate(pieces):
        reasons = cache.decode_samples(root, tmp_path / f"piece{k}", piece, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)
        assert list(reasons) == piece
        for name, reason in reasons.items():
            if reason is None:
                arrays[name] = cache.clip_arrays(tmp_path / f"piece{k}" / f"{name}.npz")
                sizes += (tmp_path / f"piece{k}" / f"{name}.npz").stat().st_size
            else:
                skipped[name] = reason
    assert skipped == {entry["name"]: entry["reason"] for entry in meta["skipped"]} != {}
    out = tmp_path / "assembled"
    (out / "clips").mkdir(parents=True)
    for k in range(3):
        for path in (tmp_path / f"piece{k}").iterdir():
            path.rename(out / "clips" / path.name)
    assembled = cache.assemble_cache(root, out, arrays.__getitem__, skipped, sizes, RGB_FRAMES, RGB_SIZE,
                                     SKEL_FRAMES)
    assert cache.cache_digest(out) == cache.cache_digest(cache_dir)
    assert {k: v for k, v in assembled.items() if k not in cache.RUN_KEYS} == \
        {k: v for k, v in meta.items() if k not in cache.RUN_KEYS}
    with pytest.raises(ValueError, match="no sample named"):
        cache.decode_samples(root, tmp_path / "x", ["S001C001P001R001A099"], RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)


def _clip_files(cache_or_partial: Path) -> list[str]:
    return sorted(p.name for p in (cache_or_partial / "clips").iterdir())


@pytest.mark.parametrize("workers,crash", [(1, "error"), (2, "error"), (2, "killed")])
def test_an_interrupted_prepare_resumes_with_the_clips_left(syn_root, prepared, tmp_path, workers, crash):
    root, _, _ = syn_root
    cache_dir, meta, _, _ = prepared
    target = tmp_path / "cache"

    killed = []

    def interrupt(done, total):
        if done >= 6 and not killed:  # three samples finished
            if crash == "error":
                raise KeyboardInterrupt
            pool = [p for p in multiprocessing.active_children()
                    if p.name.startswith(("ForkServerProcess", "SpawnProcess"))]
            os.kill(pool[0].pid, signal.SIGKILL)
            killed.append(pool[0].pid)

    expected = KeyboardInterrupt if crash == "error" else BrokenProcessPool
    with pytest.raises(expected) as info:
        _quiet_prepare(root, target, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, progress=interrupt, workers=workers)
    if crash == "killed":
        assert "run prepare again to resume" in " ".join(info.value.__notes__)
    partial = tmp_path / ".cache.partial"
    assert not target.exists() and partial.is_dir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ClipDataset(partial)
    written = [name for name in _clip_files(partial) if name.endswith(".npz")]
    assert len(written) >= 3 if workers > 1 else len(written) == 3
    assert len(written) < meta["num_samples"]

    calls = []
    summary = _quiet_prepare(root, target, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=workers,
                             progress=lambda done, total: calls.append((done, total)))
    total = 2 * (meta["num_samples"] + 1)
    assert calls[0] == (2 * len(written), total) and calls[-1] == (total, total)
    assert summary["prepare"] == {"workers": workers, "decoded": meta["num_samples"] - len(written),
                                  "reused": len(written)}
    assert cache.cache_digest(target) == cache.cache_digest(cache_dir)
    assert _clip_files(target) == _clip_files(cache_dir)  # no torn write left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_prepare_never_mixes_geometries_or_formats(syn_root, tmp_path):
    root, _, _ = syn_root
    target = tmp_path / "cache"

    def stop(done, total):
        if done >= 4:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _quiet_prepare(root, target, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, progress=stop, workers=1)
    partial = tmp_path / ".cache.partial"
    before = _clip_files(partial)
    for change in (dict(rgb_size=RGB_SIZE * 2), dict(skel_frames=SKEL_FRAMES + 1), dict(cache_format="jpeg")):
        args = {"rgb_frames": RGB_FRAMES, "rgb_size": RGB_SIZE, "skel_frames": SKEL_FRAMES, **change}
        with pytest.raises(ValueError, match="earlier settings") as info:
            _quiet_prepare(root, target, workers=1, **args)
        assert str(partial) in str(info.value) and f"rgb_size={RGB_SIZE} " in str(info.value)
    assert _clip_files(partial) == before and not target.exists()
    summary = _quiet_prepare(root, target, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1)
    assert summary["prepare"]["reused"] == len(before) == 2
    # A complete cache of another geometry is replaced (on success only), never mixed in.
    other = _quiet_prepare(root, target, RGB_FRAMES, RGB_SIZE * 2, SKEL_FRAMES, workers=1)
    assert other["prepare"]["reused"] == 0 and ClipDataset(target)[0][0].shape[-1] == RGB_SIZE * 2


def test_re_preparing_a_cache_decodes_only_changed_samples(syn_root, prepared, tmp_path):
    root, _, _ = syn_root
    cache_dir, meta, _, _ = prepared
    source = tmp_path / "root"
    shutil.copytree(root, source)  # copy2: sizes and modification times are kept
    target = tmp_path / "cache"
    shutil.copytree(cache_dir, target)
    old_clip = (target / "clips" / "S001C002P003R001A002.npz").stat().st_ino
    again = _quiet_prepare(source, target, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1)
    assert again["prepare"] == {"workers": 1, "decoded": 0, "reused": meta["num_samples"]}
    assert (target / "clips" / "S001C002P003R001A002.npz").stat().st_ino == old_clip  # linked, not copied
    video = source / "nturgb+d_rgb" / "S001C002P003R001A002_rgb.avi"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    (source / "nturgb+d_rgb" / "S001C001P003R001A003_rgb.avi").unlink()
    changed = _quiet_prepare(source, target, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1)
    assert changed["prepare"] == {"workers": 1, "decoded": 1, "reused": meta["num_samples"] - 2}
    assert changed["num_samples"] == meta["num_samples"] - 1
    assert "S001C001P003R001A003.npz" not in _clip_files(target)
    assert cache.load_meta(cache_dir) == meta  # the original, hard-linked from, is untouched


def test_jpeg_cache_round_trips_within_a_few_levels(syn_root, prepared, tmp_path):
    root, _, _ = syn_root
    cache_dir, meta, _, _ = prepared
    summary = _quiet_prepare(root, tmp_path / "jpeg", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1,
                             cache_format="jpeg")
    assert summary["cache_format"] == "jpeg" and summary["arrays"]["rgb"]["format"] == "jpeg"
    name = meta["samples"][0]["name"]
    with np.load(tmp_path / "jpeg" / "clips" / f"{name}.npz") as clip:
        assert "rgb" not in clip.files and clip["rgb_jpeg_sizes"].shape == (RGB_FRAMES,)
    raw, jpeg = ClipDataset(cache_dir, split="all"), ClipDataset(tmp_path / "jpeg", split="all")
    errors = []
    for i in range(len(raw)):
        (r_rgb, r_skel, r_label), (j_rgb, j_skel, j_label) = raw[i], jpeg[i]
        assert j_rgb.shape == r_rgb.shape and j_rgb.dtype == torch.float32
        assert torch.equal(j_skel, r_skel) and j_label == r_label  # only RGB is compressed
        errors.append((j_rgb - r_rgb).abs() * 255)
    errors = torch.stack(errors)
    # Measured here: max 20, mean 2.6 levels of 255 (sharp synthetic edges at 16x16 px).
    assert 0 < float(errors.max()) <= 32 and float(errors.mean()) <= 3.5, (errors.max(), errors.mean())
    # Encoding is deterministic: two workers write the same JPEG bytes.
    _quiet_prepare(root, tmp_path / "jpeg2", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=2, cache_format="jpeg")
    assert cache.cache_digest(tmp_path / "jpeg2") == cache.cache_digest(tmp_path / "jpeg") != \
        cache.cache_digest(cache_dir)
    with pytest.raises(ValueError, match="cache_format"):
        prepare(root, tmp_path / "png", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, cache_format="png")


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_clip_dataset_loads_the_same_in_dataloader_workers(syn_root, prepared, tmp_path, fmt):
    cache_dir = prepared[0]
    if fmt == "jpeg":
        cache_dir = tmp_path / "jpeg"
        _quiet_prepare(syn_root[0], cache_dir, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1, cache_format="jpeg")
    ds = ClipDataset(cache_dir, "xsub", "train")
    ds[0]  # memory maps opened here must not leak into the workers
    assert pickle.loads(pickle.dumps(ds))[3][2] == ds[3][2]
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_clip_dataset_still_reads_v1_caches(prepared, tmp_path):
    cache_dir, meta, _, _ = prepared
    v1 = tmp_path / "v1"
    v1.mkdir()
    rgb = np.stack([np.load(cache_dir / "clips" / f"{s['name']}.npz")["rgb"] for s in meta["samples"]])
    np.save(v1 / "rgb.npy", rgb)
    for name in ("skel.npy", "labels.npy"):
        shutil.copy(cache_dir / name, v1 / name)
    old = {k: v for k, v in meta.items() if k not in ("cache_format", "prepare", "bytes_per_clip")}
    (v1 / "meta.json").write_text(json.dumps({**old, "format": "robustact.cache/v1"}))
    new, legacy = ClipDataset(cache_dir, "xview", "test"), ClipDataset(v1, "xview", "test")
    for i in range(len(new)):
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(new[i], legacy[i]))
    assert len(cache.cache_digest(v1)) == 64


def test_data_modules_import_only_allowed_packages():
    allowed = {"av", "numpy", "torch", "__future__"}
    for module in (ntu, synth, cache):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed | set(sys.stdlib_module_names), (module.__name__, roots)


def test_a_model_sees_another_cache_through_its_own_skeleton_constants(syn_root, prepared, tmp_path):
    """Issue 11, item 3: a cache prepared with other skeleton constants (here: the same
    clips, a wider range) gives a model other inputs unless it is opened with the model's
    normalisation; with it, every skeleton is the one the model's own cache holds, and
    evaluation refuses the mismatch instead of changing accuracy silently."""
    import shutil

    import torch

    from robustact.models.data.ntu import scale_skeleton
    from robustact.models.evaluate import check_normalisation

    cache_dir, meta, _, _ = prepared
    other = tmp_path / "other"
    shutil.copytree(cache_dir, other)
    wide_min = [v - 0.5 for v in meta["skel_min"]]
    wide_max = [v + 0.7 for v in meta["skel_max"]]
    skel = np.load(other / "skel.npy")
    for i, sample in enumerate(meta["samples"]):
        with np.load(other / "clips" / f"{sample['name']}.npz") as clip:
            skel[i] = scale_skeleton(clip["skel"], wide_min, wide_max).transpose(2, 0, 1, 3)
    np.save(other / "skel.npy", skel)
    other_meta = {**meta, "skel_min": wide_min, "skel_max": wide_max}
    (other / "meta.json").write_text(json.dumps(other_meta))

    model_norm = {"skel_min": meta["skel_min"], "skel_max": meta["skel_max"]}
    own = ClipDataset(cache_dir, split="all")
    plain = ClipDataset(other, split="all")
    fixed = ClipDataset(other, split="all", normalisation=model_norm)
    assert fixed.skel_min == tuple(meta["skel_min"]) and plain.skel_min == tuple(wide_min)
    differ = 0
    for i in range(len(own)):
        assert torch.equal(fixed[i][1], own[i][1]), i
        assert torch.equal(fixed[i][0], own[i][0])
        differ += not torch.allclose(plain[i][1], own[i][1], atol=1e-3)
    assert differ == len(own)  # the cache's own constants would have changed every clip
    # absent bodies stay absent
    assert torch.equal(fixed[0][1] == 0, own[0][1] == 0)
    sub = fixed.subset(3, seed=0)
    assert torch.equal(sub[0][1], own[int(np.flatnonzero(own.indices == sub.indices[0])[0])][1])
    # evaluation refuses a dataset scaled otherwise than the checkpoint says
    check_normalisation(fixed, {"normalisation": model_norm})
    check_normalisation(torch.utils.data.Subset(fixed, [0, 1]), {"normalisation": model_norm})
    with pytest.raises(ValueError, match="normalisation"):
        check_normalisation(torch.utils.data.Subset(plain, [0, 1]), {"normalisation": model_norm})
