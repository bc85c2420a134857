"""Decode uploaded clips in child processes, so that a clip built to exhaust memory or CPU
costs a child process, not the API.

A :class:`DecoderPool` keeps ``size`` decoder processes, each a fresh interpreter
(``python -c``, fork + exec like multiprocessing's ``spawn``: the multi-threaded API is
never forked without exec) talking over a ``multiprocessing`` connection on a socket pair.
Unlike ``spawn`` it does not re-run the API's ``__main__`` script in every child, and it
sets ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MALLOC_ARENA_MAX`` before the
interpreter loads numpy and torch. A child sets torch to one thread, imports torch and
PyAV, caps its address space at what it maps after those imports plus ``memory_mb``
(``RLIMIT_AS``; torch alone maps far more than it touches, so the budget counts from
there), reports ready, and serves one request at a time.

The parent copies an upload to a temporary file and sends the child its path with plain
parameters (the model's input geometry and the limits) as JSON. The child decodes it as
:func:`decode` does and answers with a JSON header and the array as ``np.save`` bytes;
nothing sent by a child is unpickled, so a child subverted by a crafted clip cannot run
code in the API. The parent waits ``timeout_s``; a child that is late, dies or runs out
of memory is killed and replaced, and the request fails with a :class:`DecodeError`:

* the clip is malformed or above a limit (frames, resolution, duration) → 422;
* decoding took longer than ``timeout_s`` → 422 ("too expensive to decode");
* decoding needed more than ``memory_mb`` → 422;
* the child crashed, could not start, or every child stayed busy → 503 ("try again").
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from robustact.models.data import ntu, openpose

if TYPE_CHECKING:
    from robustact.models.config import ModelConfig
    from robustact.service.settings import Settings

log = logging.getLogger("robustact.decoder")

VIDEO, SKELETON = "video", "skeleton"
# One thread each (a child decodes one upload on one core), and two malloc arenas: glibc
# reserves 64 MiB of address space per arena, which would count against RLIMIT_AS.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
_ROOT = Path(__file__).resolve().parents[1]  # the directory holding service/ and models/
_COPY_CHUNK = 1 << 20
_HEADER_MAX_BYTES = 1 << 16


class DecodeError(Exception):
    """An upload could not be decoded; ``status`` is the HTTP answer.

    422 when the clip is at fault (malformed, shaped unlike the model's input, above a
    limit, too slow or too large to decode), 503 when the decoder is (it crashed or could
    not start, or all decoders stayed busy): the same request may then succeed later.
    """

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class Geometry:
    """The model input an upload is decoded to, and the skeleton normalisation constants."""

    rgb_frames: int
    rgb_size: int
    skel_frames: int
    joints: int
    persons: int
    skel_min: tuple[float, ...] | None  # None: no skeleton is decoded with it
    skel_max: tuple[float, ...] | None
    skel_channels: int = 3  # coordinates per joint: 3 (x, y, z) or 2 (x, y)

    @classmethod
    def of(cls, cfg: "ModelConfig", meta: dict[str, Any] | None = None) -> "Geometry":
        """From a model config and its checkpoint's metadata (which holds the normalisation)."""
        norm = (meta or {}).get("normalisation")
        lo, hi = (tuple(map(float, norm["skel_min"])), tuple(map(float, norm["skel_max"]))) if norm else (None, None)
        return cls(cfg.rgb_frames, cfg.rgb_size, cfg.skel_frames, cfg.joints, cfg.persons, lo, hi, cfg.skel_channels)

    def shape(self, kind: str) -> tuple[int, ...]:
        """Shape of the decoded array: (3, T, S, S) for a video, (C, T, V, M) for a skeleton."""
        if kind == VIDEO:
            return (3, self.rgb_frames, self.rgb_size, self.rgb_size)
        return (self.skel_channels, self.skel_frames, self.joints, self.persons)


@dataclass(frozen=True)
class Limits:
    """What an upload may declare or hold before it is refused; None means unbounded."""

    max_skeleton_frames: int | None = None
    max_video_frames: int | None = None
    max_video_seconds: float | None = None
    max_video_width: int | None = None
    max_video_height: int | None = None

    @classmethod
    def of(cls, settings: "Settings") -> "Limits":
        return cls(settings.max_skeleton_frames, settings.max_video_frames, settings.max_video_seconds,
                   settings.max_video_width, settings.max_video_height)


# --------------------------------------------------------------------------- decoding


def decode(kind: str, source: str | os.PathLike | BinaryIO, suffix: str, filename: str, field: str,
           geometry: Geometry, limits: Limits = Limits()) -> tuple[np.ndarray, dict[str, Any]]:
    """One upload as the model's float32 input in [0, 1] (``geometry.shape(kind)``) and a
    JSON-able summary of what was read.

    ``source`` is a path or a binary file positioned at the start of the upload; ``suffix``
    its (already checked) extension. A video is sampled and resized by
    ``ntu.read_video``; a skeleton (``.skeleton`` text, ``.npy`` of T×V×C or T×V×C×M, or
    ``.json`` OpenPose frames, see :func:`_openpose_frames`) is checked against the model,
    padded with absent bodies, resampled, then scaled, in the order of the training cache.
    Raises :class:`DecodeError` (422) naming the problem.
    """
    if kind == VIDEO:
        return _decode_video(source, filename, field, geometry, limits)
    return _decode_skeleton(source, suffix, filename, field, geometry, limits)


def _decode_video(source, filename: str, field: str, geometry: Geometry, limits: Limits):
    try:
        clip = ntu.read_video(source, geometry.rgb_frames, geometry.rgb_size, name=filename,
                              max_frames=limits.max_video_frames, max_width=limits.max_video_width,
                              max_height=limits.max_video_height, max_seconds=limits.max_video_seconds)
    except ntu.VideoTooLargeError as e:
        raise DecodeError(field, f"video {filename!r} is too large to decode: {e.message}") from None
    except ntu.VideoDecodeError as e:
        raise DecodeError(field, f"corrupt or unreadable video {filename!r}: {e.message}") from None
    rgb = clip.astype(np.float32)
    rgb /= np.float32(255.0)
    return rgb, {"frames": geometry.rgb_frames, "size": geometry.rgb_size}


def _read_bytes(source) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    return source.read()


def _skeleton_array(source, suffix: str, filename: str, field: str, max_frames: int | None):
    """The upload as ``(T, V, C, M)`` float32, before any model-specific check."""
    data = _read_bytes(source)
    if not data:
        raise DecodeError(field, f"{filename!r} is empty")
    if suffix == ".json":
        return _openpose_array(data, filename, field, max_frames)
    if suffix == ".skeleton":
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DecodeError(field, f"{filename}: line {line}: not a text file (non-ASCII byte)") from None
        del data
        try:
            return ntu.read_skeleton_text(text, filename, max_frames)
        except ntu.SkeletonFormatError as e:
            raise DecodeError(field, f"malformed skeleton file: {e}") from None
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DecodeError(field, f"{filename!r} is not a readable .npy array ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        raise DecodeError(field, f"{filename!r}: expected a numeric array, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DecodeError(field, f"{filename!r} has shape {tuple(array.shape)}; expected T×V×C or "
                                 "T×V×C×M (frames, joints, coordinates, bodies)")
    if max_frames is not None and array.shape[0] > max_frames:
        raise DecodeError(field, f"{filename!r}: {array.shape[0]} frames is above the {max_frames}-frame limit")
    if not np.isfinite(array).all():
        raise DecodeError(field, f"{filename!r} holds NaN or infinite coordinates")
    return array.astype(np.float32)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _json_number(literal: str) -> float:
    """A parse hook: a number a float32 cannot hold (OpenPose writes none) is refused."""
    value = float(literal)
    if not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
        raise ValueError(f"the number {literal[:30]} is beyond the float32 range")
    return value


def _malformed(field: str, filename: str, message: str) -> DecodeError:
    return DecodeError(field, f"malformed OpenPose skeleton {filename!r}: {message}")


def _openpose_array(data: bytes, filename: str, field: str, max_frames: int | None) -> np.ndarray:
    """An OpenPose ``.json`` upload as ``(T, 22, 2, 1)``: the main person and the gaps
    filled as in training (``openpose.read_openpose_frames``).

    The upload is a JSON array of per-frame documents (``{"people": [...]}`` as OpenPose
    writes one per video frame, in time order) or an object whose ``"frames"`` member is
    that array. The whole document is parsed at once: its size is bounded by the upload
    limit and the child's memory cap. Errors name the frame (0-based)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _malformed(field, filename, f"not UTF-8 text (byte {e.start})") from None
    try:
        doc = json.loads(text, parse_int=_json_number, parse_float=_json_number)
    except json.JSONDecodeError as e:
        raise _malformed(field, filename, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # refused by _json_number
        raise _malformed(field, filename, str(e)) from None
    except RecursionError:
        raise _malformed(field, filename, "nested too deeply") from None
    del text
    frames = doc.get("frames") if isinstance(doc, dict) else doc
    if not isinstance(frames, list):
        raise _malformed(field, filename, 'expected a JSON array of OpenPose frames, or an object with a "frames" array')
    if not frames:
        raise _malformed(field, filename, "it holds no frames")
    if max_frames is not None and len(frames) > max_frames:
        raise DecodeError(field, f"{filename!r}: {len(frames)} frames is above the {max_frames}-frame limit")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise _malformed(field, filename, f'frame {i}: not an OpenPose frame: expected an object with a "people" list')
    try:
        return openpose.read_openpose_frames(frames, [f"frame {i}" for i in range(len(frames))])
    except ntu.EmptySkeletonError as e:
        raise DecodeError(field, f"{filename!r}: {e.message}") from None
    except ntu.SkeletonFormatError as e:
        raise _malformed(field, filename, str(e)) from None


def _decode_skeleton(source, suffix: str, filename: str, field: str, geometry: Geometry, limits: Limits):
    if geometry.skel_min is None or geometry.skel_max is None:
        raise ValueError("decoding a skeleton needs the checkpoint's normalisation constants")
    array = _skeleton_array(source, suffix, filename, field, limits.max_skeleton_frames)
    frames, joints, coords, bodies = array.shape
    if frames < 1:
        raise DecodeError(field, "the skeleton has no frames")
    if coords != geometry.skel_channels:  # first: a 2-D pose for a 3-D model is the wrong kind of skeleton
        want = "3 (x, y, z)" if geometry.skel_channels == 3 else "2 (x, y)"
        raise DecodeError(field, f"the skeleton has {coords} coordinates per joint; this model expects {want}")
    if joints != geometry.joints:
        raise DecodeError(field, f"the skeleton has {joints} joints per body; this model expects {geometry.joints}")
    if bodies > geometry.persons:
        raise DecodeError(field, f"the skeleton has {bodies} bodies; this model takes at most {geometry.persons}")
    if bodies < geometry.persons:
        array = np.concatenate([array, np.zeros((frames, joints, coords, geometry.persons - bodies), np.float32)],
                               axis=3)
    # The order of the training cache (models.data.cache.prepare): resample, then scale.
    resampled = ntu.resample_skeleton(array, geometry.skel_frames)
    scaled = ntu.scale_skeleton(resampled, geometry.skel_min, geometry.skel_max)
    skel = np.ascontiguousarray(scaled.transpose(2, 0, 1, 3))
    return skel, {"frames": frames, "resampled_to": geometry.skel_frames, "joints": joints, "bodies": bodies}


# --------------------------------------------------------------------------- the child


def _vm_size_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    raise RuntimeError("no VmSize in /proc/self/status")


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch's CPU allocator reports a failed allocation as a RuntimeError.
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _serve(request: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """Answer one request: (JSON header, ``np.save`` bytes or None)."""
    try:
        array, inputs = decode(request["kind"], request["path"], request["suffix"], request["filename"],
                               request["field"], Geometry(**request["geometry"]), Limits(**request["limits"]))
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        del array
        return {"ok": True, "inputs": inputs}, buffer.getvalue()
    except DecodeError as e:
        return {"ok": False, "kind": "content", "field": e.field, "message": e.message}, None
    except Exception as e:  # noqa: BLE001 - every failure goes back as data, never pickled
        kind = "memory" if _is_out_of_memory(e) else "bug"
        return {"ok": False, "kind": kind, "message": f"{type(e).__name__}: {e}"[:2000]}, None


def _child_main(fd: int, memory_mb: int) -> None:
    """A decoder process: set up, report ready, then answer requests until the pipe closes."""
    conn = Connection(fd)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    baseline_kb = _vm_size_kb()
    limit = (baseline_kb << 10) + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send_bytes(json.dumps({"ready": True, "pid": os.getpid(), "baseline_mb": baseline_kb / 1024}).encode())
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        header, payload = _serve(request)
        conn.send_bytes(json.dumps(header).encode())
        if payload is not None:
            conn.send_bytes(payload)


# --------------------------------------------------------------------------- the pool


class _Child:
    """One decoder process and the parent's end of its connection."""

    def __init__(self, memory_mb: int):
        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {str(_ROOT)!r}); from service.decoder import _child_main; "
                f"_child_main({theirs.fileno()}, {int(memory_mb)})")
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                            env={**os.environ, **CHILD_ENV}, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False
        self.baseline_mb: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the child's ready message; False if it died or is late."""
        if self.ready:
            return True
        try:
            if not self.conn.poll(timeout_s):
                return False
            hello = json.loads(self.conn.recv_bytes(_HEADER_MAX_BYTES))
        except (EOFError, OSError, ValueError):
            return False
        self.ready = isinstance(hello, dict) and hello.get("ready") is True
        self.baseline_mb = hello.get("baseline_mb") if self.ready else None
        return self.ready

    def kill(self) -> None:
        self.conn.close()
        if self.alive():
            self.process.kill()
        self.process.wait(5)


class DecoderPool:
    """``size`` decoder processes, each decoding one upload at a time; thread-safe.

    The children are started by the constructor and import torch and PyAV in the
    background (under a second each on two idle cores with warm file caches; each then holds
    about 250 MiB resident), so the API starts at once and only a request that comes
    earlier waits for the rest. ``tmp_dir`` receives the uploads copied for the children (a fresh subdirectory,
    removed by ``close``). A request waits up to ``acquire_timeout_s`` for an idle child
    (default: ``start_timeout_s + timeout_s``, enough for a decode in progress to end or
    time out and its replacement to start), then fails with 503.
    """

    def __init__(self, size: int, tmp_dir: str | os.PathLike, limits: Limits = Limits(), timeout_s: float = 30.0,
                 memory_mb: int = 1024, start_timeout_s: float = 60.0, acquire_timeout_s: float | None = None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.limits, self.timeout_s, self.memory_mb = size, limits, timeout_s, memory_mb
        self.start_timeout_s = start_timeout_s
        self.acquire_timeout_s = acquire_timeout_s if acquire_timeout_s is not None else start_timeout_s + timeout_s
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="decode-", dir=tmp_dir))
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Child] = queue.Queue()
        self._children: set[_Child] = set()
        self._busy: set[_Child] = set()
        self._closed = False
        for _ in range(size):
            self._idle.put(self._start_child())

    # -- introspection (tests, health) ----------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of the live children, idle or busy."""
        with self._lock:
            return sorted(c.pid for c in self._children)

    @property
    def busy_pids(self) -> list[int]:
        """Process ids of the children decoding now."""
        with self._lock:
            return sorted(c.pid for c in self._busy)

    def wait_ready(self, timeout_s: float | None = None) -> list[float]:
        """Block until every idle child has started; their memory baselines in MiB."""
        children = []
        try:
            while True:
                children.append(self._idle.get_nowait())
        except queue.Empty:
            pass
        try:
            for child in children:
                child.wait_ready(timeout_s if timeout_s is not None else self.start_timeout_s)
            return [c.baseline_mb for c in children if c.ready]
        finally:
            for child in children:
                self._idle.put(child)

    # -- decoding -------------------------------------------------------------------------

    def decode(self, kind: str, upload: BinaryIO, suffix: str, filename: str, field: str,
               geometry: Geometry) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode one upload in a child; see :func:`decode`. Raises :class:`DecodeError`."""
        path = self._spool(upload, suffix)
        try:
            request = {"kind": kind, "path": str(path), "suffix": suffix, "filename": filename, "field": field,
                       "geometry": asdict(geometry), "limits": asdict(self.limits)}
            return self._run(request, geometry.shape(kind))
        finally:
            path.unlink(missing_ok=True)

    def _spool(self, upload: BinaryIO, suffix: str) -> Path:
        """Copy the upload, in chunks, to a file the child can open by name."""
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                upload.seek(0)
                shutil.copyfileobj(upload, out, _COPY_CHUNK)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def _run(self, request: dict[str, Any], shape: tuple[int, ...]):
        field, filename = request["field"], request["filename"]
        child = self._acquire(field)
        try:
            answer = self._exchange(child, request, 4 * int(np.prod(shape)) + 1024)
        except BaseException:  # interrupted while the child works: it cannot be reused
            self._discard(child)
            raise
        if answer is None:
            self._discard(child)
            raise DecodeError(field, f"decoding {filename!r} took longer than {self.timeout_s:g} s; "
                                     "the clip is too expensive to decode")
        header, payload = answer
        if header is None:
            code = child.process.poll()
            self._discard(child)
            log.warning("decoder %s failed on %r (exit code %s)", child.pid, filename, code)
            raise DecodeError(field, "the decoder crashed; try again", 503)
        if header.get("ok"):
            self._release(child)
            array = np.load(io.BytesIO(payload), allow_pickle=False)
            if array.shape != shape or array.dtype != np.float32:
                raise RuntimeError(f"decoder returned {array.dtype} {array.shape}, expected float32 {shape}")
            return array, header["inputs"]
        if header.get("kind") == "content":
            self._release(child)
            raise DecodeError(field, str(header["message"]))
        if header.get("kind") == "memory":
            # A fresh child: the heap of one that hit its limit may stay fragmented.
            self._discard(child)
            raise DecodeError(field, f"{filename!r} needs more than {self.memory_mb} MiB to decode")
        self._release(child)
        raise RuntimeError(f"decoder failed on {filename!r}: {header.get('message')}")

    def _exchange(self, child: _Child, request: dict[str, Any], max_payload: int):
        """Send a request and read the answer: None if the child is late, (None, None) if it
        died or answered garbage, else (header, payload or None)."""
        try:
            child.conn.send_bytes(json.dumps(request).encode())
            if not child.conn.poll(self.timeout_s):
                return None
            header = json.loads(child.conn.recv_bytes(_HEADER_MAX_BYTES))
            if not isinstance(header, dict):
                return None, None
            payload = child.conn.recv_bytes(max_payload) if header.get("ok") else None
        except (EOFError, OSError, ValueError):
            # EOF: the child died (killed, segfault); OSError: a broken pipe or an oversized
            # message; ValueError: a garbled header.
            return None, None
        return header, payload

    def _acquire(self, field: str) -> _Child:
        """An idle, started child, marked busy; DecodeError 503 if none comes in time.

        A child found dead while idle (killed from outside) is replaced and the wait goes
        on; one that never started fails the request, so a broken install cannot make
        every request start processes in a loop.
        """
        deadline = time.monotonic() + self.acquire_timeout_s
        while True:
            try:
                child = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DecodeError(field, f"all {self.size} decoders stayed busy; try again", 503) from None
            if self._closed:
                self._idle.put(child)
                raise DecodeError(field, "the decoders are shutting down", 503)
            if child.wait_ready(self.start_timeout_s) and child.alive():
                with self._lock:
                    self._busy.add(child)
                return child
            started = child.ready
            self._discard(child)
            if not started:
                log.error("decoder %s did not start within %g s (exit code %s)", child.pid, self.start_timeout_s,
                          child.process.poll())
                raise DecodeError(field, "the decoder could not start; try again", 503)

    def _release(self, child: _Child) -> None:
        with self._lock:
            self._busy.discard(child)
        self._idle.put(child)

    def _discard(self, child: _Child) -> None:
        """Kill a child and start its replacement (which imports in the background)."""
        with self._lock:
            self._busy.discard(child)
            self._children.discard(child)
        child.kill()
        if not self._closed:
            self._idle.put(self._start_child())

    def _start_child(self) -> _Child:
        child = _Child(self.memory_mb)
        with self._lock:
            self._children.add(child)
        return child

    def close(self) -> None:
        """Stop every child (busy ones are killed) and remove the upload directory."""
        self._closed = True
        with self._lock:
            children = list(self._children)
            self._children.clear()
        for child in children:
            child.kill()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def make_decoder_pool(settings: "Settings") -> DecoderPool:
    """The API's pool: ``decode_workers`` children (0: one per core), limits, time and
    memory budgets from ``settings``; uploads are copied under ``DATA_DIR/uploads``."""
    size = settings.decode_workers if settings.decode_workers > 0 else max(1, os.cpu_count() or 1)
    return DecoderPool(size, settings.data_dir / "uploads", Limits.of(settings), settings.decode_timeout_s,
                       settings.decode_memory_mb)
