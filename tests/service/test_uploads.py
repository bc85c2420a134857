"""Uploads that cannot take the API down (issue 8): classify decodes every upload in a
decoder process, within limits on what a clip may declare (frames, resolution, duration)
and on the time and memory its decoding may take.

The first tests drive a ``DecoderPool`` directly; the others a live API (uvicorn in a
thread of this process, so its resident memory is this process's) with a randomly
initialised tiny model. Every hostile upload gets a 4xx or 503 naming the reason, within
a bounded time, while ``/healthz`` keeps answering, and a normal clip classifies after it.
The clips are real files: PyAV-encoded videos and ``.skeleton`` texts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import av
import httpx
import numpy as np
import pytest

from robustact.models.data import ntu
from robustact.service.decoder import SKELETON, VIDEO, DecodeError, DecoderPool, Geometry, Limits, decode
from tests.service.test_bad_input import _tiny_model

SAMPLE = "S001C001P003R001A002"
GEOMETRY = Geometry(rgb_frames=16, rgb_size=32, skel_frames=16, joints=25, persons=2,
                    skel_min=(-1.5, -1.5, 1.5), skel_max=(1.5, 1.5, 4.5))
LIMITS = Limits(max_skeleton_frames=10000, max_video_frames=10000, max_video_seconds=600.0,
                max_video_width=1920, max_video_height=1080)
RSS_GROWTH_BOUND_MB = 200


# --------------------------------------------------------------------------- clips


def encode_video(path: Path, frames: int, width: int, height: int) -> Path:
    """An mpeg4 ``.mp4`` of ``frames`` frames, each a flat grey that changes with time."""
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        pictures = [av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
                    for level in (40, 120, 200)]
        for index in range(frames):
            out.mux(stream.encode(pictures[index % 3]))
        out.mux(stream.encode())
    return path


def first_frame(skeleton: str) -> list[str]:
    """The lines of a ``.skeleton`` text's first frame (its body count, then its bodies)."""
    lines = skeleton.splitlines()
    bodies = int(lines[1])
    return lines[1:2 + 27 * bodies]


def skeleton_bomb(skeleton: str, empty_frames: int = 2_000_000) -> bytes:
    """A real first frame, then ``empty_frames`` frames with no body (CRLF, like NTU's files),
    the declared count to match: 6 MB that used to become a 600 MB array and more."""
    lines = [str(1 + empty_frames), *first_frame(skeleton)] + ["0"] * empty_frames
    return ("\r\n".join(lines) + "\r\n").encode()


def long_skeleton(skeleton: str, frames: int = 10000) -> bytes:
    """A legitimate but slow clip: the first frame repeated ``frames`` times (the limit)."""
    frame = "\n".join(first_frame(skeleton))
    return (f"{frames}\n" + "\n".join([frame] * frames) + "\n").encode()


@pytest.fixture(scope="module")
def clips(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """A normal clip of the synthetic dataset and the hostile or expensive ones."""
    directory = tmp_path_factory.mktemp("clips")
    skeleton = (synthetic_root / ntu.SKELETON_DIR / f"{SAMPLE}{ntu.SKELETON_SUFFIX}").read_text()
    paths = {"video": synthetic_root / ntu.RGB_DIR / f"{SAMPLE}{ntu.VIDEO_SUFFIX}",
             "skeleton": synthetic_root / ntu.SKELETON_DIR / f"{SAMPLE}{ntu.SKELETON_SUFFIX}",
             "bomb": directory / "bomb.skeleton", "long": directory / "long.skeleton"}
    paths["bomb"].write_bytes(skeleton_bomb(skeleton))
    paths["long"].write_bytes(long_skeleton(skeleton))
    started = time.perf_counter()
    paths["many"] = encode_video(directory / "many.mp4", 100_000, 16, 16)  # about 1 s, 1.3 MB
    assert time.perf_counter() - started < 30
    paths["wide"] = encode_video(directory / "wide.mp4", 3, 4096, 2160)
    paths["huge"] = encode_video(directory / "huge.mp4", 2, 4096, 4096)  # within 4096x4096 limits
    return paths


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kill_when_busy(pid_of_busy: Callable[[], int | None], deadline_s: float = 30.0) -> int:
    """SIGKILL the decoder that ``pid_of_busy()`` names once it has used CPU for a request."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        pid = pid_of_busy()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.005)
    raise AssertionError("no decoder became busy")


def wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until a killed process has exited (a zombie until its parent reaps it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running")


# --------------------------------------------------------------------------- the pool


@pytest.fixture
def pool_factory(tmp_path):
    pools: list[DecoderPool] = []

    def make(size: int = 1, **options) -> DecoderPool:
        pool = DecoderPool(size, tmp_path / "uploads", options.pop("limits", LIMITS), **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def pool_decode(pool: DecoderPool, kind: str, path: Path, name: str | None = None):
    with open(path, "rb") as upload:
        return pool.decode(kind, upload, path.suffix, name or path.name, kind, GEOMETRY)


def test_pool_decodes_as_in_process_and_cleans_up(pool_factory, clips, tmp_path):
    started = time.perf_counter()
    pool = pool_factory(2)
    baselines = pool.wait_ready()
    start_s = time.perf_counter() - started
    assert len(baselines) == 2 and start_s < 60, (baselines, start_s)
    print(f"two decoders started in {start_s:.2f} s; address space after imports {baselines} MiB")
    for kind, suffix in ((VIDEO, ".avi"), (SKELETON, ".skeleton")):
        array, inputs = pool_decode(pool, kind, clips[kind])
        expected, expected_inputs = decode(kind, str(clips[kind]), suffix, clips[kind].name, kind, GEOMETRY)
        assert array.dtype == np.float32 and array.shape == GEOMETRY.shape(kind)
        np.testing.assert_array_equal(array, expected)
        assert inputs == expected_inputs
    assert list(pool.tmp_dir.iterdir()) == []  # each upload copy is removed after its decode
    pids = pool.pids
    pool.close()
    assert not pool.tmp_dir.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # stopped and reaped


def test_pool_serves_many_threads(pool_factory, clips):
    pool = pool_factory(2)
    results, errors = [], []

    def work(kind):
        try:
            results.append(pool_decode(pool, kind, clips[kind])[0].shape)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(VIDEO if i % 2 else SKELETON,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 8
    assert pool.busy_pids == [] and len(pool.pids) == 2


def test_pool_refuses_hostile_clips_by_their_headers(pool_factory, clips):
    pool = pool_factory(1)
    for kind, path, words in [(SKELETON, clips["bomb"], "2000001 frames is above the 10000-frame limit"),
                              (VIDEO, clips["many"], "100000 frames is above the 10000-frame limit"),
                              (VIDEO, clips["wide"], "4096x2160 is above the 1920x1080 limit")]:
        started = time.perf_counter()
        with pytest.raises(DecodeError) as info:
            pool_decode(pool, kind, path)
        assert info.value.status == 422 and words in info.value.message, info.value
        assert time.perf_counter() - started < 15
    assert len(pool.pids) == 1  # content errors keep the child


def test_pool_kills_a_late_decoder_and_replaces_it(pool_factory, clips):
    pool = pool_factory(1, timeout_s=0.2)
    pool.wait_ready()
    first = pool.pids
    with pytest.raises(DecodeError) as info:
        pool_decode(pool, SKELETON, clips["long"])
    assert info.value.status == 422
    assert info.value.message == ("decoding 'long.skeleton' took longer than 0.2 s; "
                                  "the clip is too expensive to decode")
    assert pool.pids != first and not Path(f"/proc/{first[0]}/cmdline").exists()
    assert pool_decode(pool, SKELETON, clips["skeleton"])[0].shape == GEOMETRY.shape(SKELETON)


def test_pool_survives_a_decoder_killed_mid_decode(pool_factory, clips):
    pool = pool_factory(1)
    pool.wait_ready()
    outcome: list = []

    def run():
        try:
            outcome.append(pool_decode(pool, SKELETON, clips["long"]))
        except DecodeError as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    killed = kill_when_busy(lambda: (pool.busy_pids or [None])[0])
    thread.join(60)
    (error,) = outcome
    assert isinstance(error, DecodeError), error
    assert (error.status, error.message) == (503, "the decoder crashed; try again")
    assert killed not in pool.pids and len(pool.pids) == 1
    assert pool_decode(pool, VIDEO, clips["video"])[0].shape == GEOMETRY.shape(VIDEO)
    # A child killed while idle is replaced when next needed; the request does not fail.
    (idle,) = pool.pids
    os.kill(idle, signal.SIGKILL)
    wait_dead(idle)
    assert pool_decode(pool, VIDEO, clips["video"])[0].shape == GEOMETRY.shape(VIDEO)
    assert pool.pids != [idle]


def test_pool_memory_budget(pool_factory, clips):
    limits = Limits(max_video_width=4096, max_video_height=4096)
    pool = pool_factory(1, memory_mb=320, limits=limits)
    with pytest.raises(DecodeError) as info:
        pool_decode(pool, VIDEO, clips["huge"])
    assert (info.value.status, info.value.message) == (422, "'huge.mp4' needs more than 320 MiB to decode")
    assert pool_decode(pool, VIDEO, clips["video"])[0].shape == GEOMETRY.shape(VIDEO)


# --------------------------------------------------------------------------- over HTTP


def rss_mb() -> float:
    """Resident memory of this process (which runs the API), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def decoder_pids() -> list[int]:
    """The decoder processes started by this process (the API's pool)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"_child_main" in cmdline:
            pids.append(int(entry.name))
    return pids


class Api:
    """A live API with one decoder and a tiny model, and the classify calls of the tests."""

    def __init__(self, live_service, backend: str = "embedded", **settings):
        self.service = live_service(backend, workers=0, decode_workers=1, **settings)
        self.client = self.service.client
        self.model_id = _tiny_model(self.service.settings, {"num_classes": 3, "class_names": ["a", "b", "c"],
                                                            "id": None})

    def classify(self, video: tuple | None = None, skeleton: tuple | None = None):
        files = {name: value for name, value in (("video", video), ("skeleton", skeleton)) if value is not None}
        return self.client.post(f"/v1/models/{self.model_id}/classify", files=files)

    def classify_normal(self, clips) -> dict:
        r = self.classify(("a.avi", clips["video"].read_bytes(), "video/x-msvideo"),
                          ("a.skeleton", clips["skeleton"].read_bytes(), "text/plain"))
        assert r.status_code == 200, r.text
        return r.json()

    def while_healthy(self, call):
        """Run ``call()`` in a thread while ``/healthz`` is polled; (its result, seconds,
        health checks made). Every check must answer 200 within a second."""
        outcome: list = []
        thread = threading.Thread(target=lambda: outcome.append(call()))
        started = time.perf_counter()
        thread.start()
        checks = 0
        with httpx.Client(base_url=self.service.url, timeout=5) as health:
            while thread.is_alive() or checks == 0:
                t0 = time.perf_counter()
                r = health.get("/healthz")
                assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
                checks += 1
                thread.join(0.02)
        return outcome[0], time.perf_counter() - started, checks

    def uploads_left(self) -> list[Path]:
        return [p for p in (self.service.settings.data_dir / "uploads").rglob("*") if p.is_file()]


def _detail(r) -> str:
    detail = r.json()["detail"]
    return detail[0]["msg"] if isinstance(detail, list) else detail


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_bombs_are_refused_at_once_and_the_api_stays_small(backend, live_service, clips):
    api = Api(live_service, backend, max_video_width=1920, max_video_height=1080)
    api.classify_normal(clips)  # model loaded, decoder warm: the baseline
    video = ("a.avi", clips["video"].read_bytes(), "video/x-msvideo")
    skeleton = ("a.skeleton", clips["skeleton"].read_bytes(), "text/plain")
    uploads = [("skeleton", (video, ("bomb.skeleton", clips["bomb"].read_bytes(), "text/plain")),
                "bomb.skeleton: line 1: 2000001 frames is above the 10000-frame limit"),
               ("video", (("many.mp4", clips["many"].read_bytes(), "video/mp4"), skeleton),
                "video 'many.mp4' is too large to decode: 100000 frames is above the 10000-frame limit"),
               ("video", (("wide.mp4", clips["wide"].read_bytes(), "video/mp4"), skeleton),
                "video 'wide.mp4' is too large to decode: 4096x2160 is above the 1920x1080 limit")]
    before = rss_mb()
    for field, files, words in uploads:
        r, seconds, _ = api.while_healthy(lambda: api.classify(*files))
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field] and words in _detail(r)
        assert seconds < 10, seconds
    growth = rss_mb() - before
    assert growth < RSS_GROWTH_BOUND_MB, f"the API grew by {growth:.0f} MiB"
    print(f"API resident memory grew by {growth:.1f} MiB over the three bombs")
    assert api.classify_normal(clips)["inputs"]["skeleton"]["frames"] == 16
    assert api.uploads_left() == []


def test_decoder_killed_mid_decode_is_503_then_classify_works(live_service, clips):
    api = Api(live_service)
    api.classify_normal(clips)
    (pid,) = decoder_pids()
    idle_ticks = cpu_ticks(pid)
    files = (("a.avi", clips["video"].read_bytes(), "video/x-msvideo"),
             ("long.skeleton", clips["long"].read_bytes(), "text/plain"))
    killer = threading.Thread(target=kill_when_busy,
                              args=(lambda: pid if cpu_ticks(pid) > idle_ticks + 10 else None,))
    killer.start()
    r, seconds, checks = api.while_healthy(lambda: api.classify(*files))
    killer.join(30)
    assert r.status_code == 503, r.text
    assert _detail(r) == "skeleton: the decoder crashed; try again" and seconds < 30
    (replacement,) = decoder_pids()
    assert replacement != pid
    api.classify_normal(clips)
    assert api.uploads_left() == []


def test_a_clip_too_slow_to_decode_is_422(live_service, clips):
    api = Api(live_service, decode_timeout_s=0.2)
    api.classify_normal(clips)
    files = (("a.avi", clips["video"].read_bytes(), "video/x-msvideo"),
             ("long.skeleton", clips["long"].read_bytes(), "text/plain"))
    r, seconds, _ = api.while_healthy(lambda: api.classify(*files))
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "skeleton"]
    assert _detail(r) == "decoding 'long.skeleton' took longer than 0.2 s; the clip is too expensive to decode"
    assert seconds < 10
    api.classify_normal(clips)


def test_a_clip_over_the_memory_budget_is_422(live_service, clips):
    api = Api(live_service, decode_memory_mb=320)
    api.classify_normal(clips)
    before = rss_mb()
    files = (("huge.mp4", clips["huge"].read_bytes(), "video/mp4"),
             ("a.skeleton", clips["skeleton"].read_bytes(), "text/plain"))
    r, seconds, _ = api.while_healthy(lambda: api.classify(*files))
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "video"]
    assert _detail(r) == "'huge.mp4' needs more than 320 MiB to decode" and seconds < 10
    assert rss_mb() - before < RSS_GROWTH_BOUND_MB
    api.classify_normal(clips)


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_no_database_connection_is_held_while_decoding(backend, live_service, clips):
    """A slow decode holds a decoder and a compute slot, never a pooled database connection."""
    api = Api(live_service, backend)
    api.classify_normal(clips)
    pool = api.service.app.state.engine.pool
    files = (("a.avi", clips["video"].read_bytes(), "video/x-msvideo"),
             ("long.skeleton", clips["long"].read_bytes(), "text/plain"))
    result: list = []
    thread = threading.Thread(target=lambda: result.append(api.classify(*files)))
    thread.start()
    decoders = api.service.app.state.decoders
    deadline = time.monotonic() + 20
    seen_busy = 0
    while thread.is_alive() and time.monotonic() < deadline:
        if decoders.busy_pids:
            seen_busy += 1
            assert pool.checkedout() == 0
        time.sleep(0.005)
    thread.join()
    assert seen_busy > 0 and result[0].status_code == 200, result[0].text


# --------------------------------------------------------------------------- OpenPose JSON


def test_a_2d_model_classifies_an_openpose_json_upload(live_service):
    """iMiGUE-style: a skeleton model on 2-D 22-joint poses takes a clip's OpenPose frames as
    JSON, decoded in the pool; a malformed frame, or a 3-D model, is a 422 saying why."""
    from tests.test_decoder import frames

    service = live_service("embedded", workers=0, decode_workers=1)
    classes = {"num_classes": 3, "class_names": ["a", "b", "c"], "id": None}
    pose_2d = _tiny_model(service.settings, classes, name="pose-2d", arch="skeleton", num_amr=0,
                          skel_channels=2, joints=22, persons=1)
    ntu_3d = _tiny_model(service.settings, classes, name="ntu-3d", arch="skeleton", num_amr=0)

    def classify(model_id: str, document, media: str = "application/json") -> httpx.Response:
        content = document if isinstance(document, bytes) else json.dumps(document).encode()
        return service.client.post(f"/v1/models/{model_id}/classify", data={"top_k": "3"},
                                   files={"skeleton": ("clip.json", content, media)})

    r = classify(pose_2d, frames(5))
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    assert len(top) == 3 and abs(sum(t["probability"] for t in top) - 1) < 1e-4
    assert r.json()["inputs"]["skeleton"] == {"frames": 5, "resampled_to": 16, "joints": 22, "bodies": 1}
    r = classify(pose_2d, {"frames": frames(2)}, "text/plain")
    assert r.status_code == 200 and r.json()["inputs"]["skeleton"]["frames"] == 2, r.text

    broken = frames(4)
    broken[3]["people"][1]["pose_keypoints_2d"] = [1.0] * 72
    for document, words in [
        (broken, "malformed OpenPose skeleton 'clip.json': frame 3: pose_keypoints_2d holds 72 values; "
                 "expected 75 (25 keypoints × x, y, confidence, OpenPose BODY_25)"),
        (b'[{"people": []}, {oops}]', "malformed OpenPose skeleton 'clip.json': not valid JSON: "
                                      "Expecting property name enclosed in double quotes (line 1, column 19)"),
        ([{"people": []}] * 2, "'clip.json': nobody detected in any of 2 frames"),
    ]:
        r = classify(pose_2d, document)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "skeleton"] and _detail(r) == words
    r = classify(ntu_3d, frames(2))
    assert r.status_code == 422, r.text
    assert _detail(r) == "the skeleton has 2 coordinates per joint; this model expects 3 (x, y, z)"
    assert classify(pose_2d, frames(2), "image/png").status_code == 415
    assert [p for p in (service.settings.data_dir / "uploads").rglob("*") if p.is_file()] == []
