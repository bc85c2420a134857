"""The iMiGUE-style dataset layout: long interview videos cut into labelled clips.

Modelled on the iMiGUE release (Liu et al., CVPR 2021: 72 subjects, 359 videos, 32
classes, cross-subject split of 37 training and 35 test subjects), as robustact reads it::

    ROOT/classes.txt    one class name per line: line k is class id k (1-based)
    ROOT/labels.csv     one clip per row, with a header naming at least
                        video_id,class,start_frame,end_frame,subject_id
                        (frames 0-based and inclusive; further columns are ignored)
    ROOT/split.json     {"train_subjects": [...], "test_subjects": [...]}
    ROOT/videos/<video_id>.mp4
    ROOT/skeleton/<video_id>/<video_id>_<frame:012d>_keypoints.json   (OpenPose, one per frame)

A clip's name is ``<video_id>_<k>`` with k its 1-based position among the video's rows
(the naming of the MiGA challenge's test clips). Class ids run 1..K; iMiGUE's id 99 (the
non-micro-gesture class) is read as class K when ``classes.txt`` has K lines and no class
99, so the release's labels CSV needs no rewriting. The only protocol is ``xsub``: a
clip is in the training split when its subject is in ``train_subjects``.

Errors name the file and, for the CSV, the line. The ``parse_*`` functions read the three
files' contents (text or bytes) wherever they come from (an object store), with the same
rules and errors as the file-based ``class_names``, ``read_split`` and ``find_clips``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

CLASSES_FILE = "classes.txt"
LABELS_FILE = "labels.csv"
SPLIT_FILE = "split.json"
VIDEO_DIR = "videos"
SKELETON_DIR = "skeleton"
NON_MICRO_GESTURE = 99
REQUIRED_COLUMNS = ("video_id", "class", "start_frame", "end_frame", "subject_id")


class LayoutError(ValueError):
    """An iMiGUE-style root is not laid out as documented. ``str()`` names the file."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}" + (f": line {line}" if line is not None else "") + f": {message}")


@dataclass(frozen=True)
class Clip:
    """One labelled clip: frames ``start``..``end`` (inclusive) of ``video_id``."""

    name: str
    video_id: str
    start: int
    end: int
    label: int  # 0-based
    subject: int
    video: Path
    skeleton_dir: Path


_EXPECTED = {
    CLASSES_FILE: "one class name per line",
    LABELS_FILE: f"columns {', '.join(REQUIRED_COLUMNS)}",
    SPLIT_FILE: '{"train_subjects": [...], "test_subjects": [...]}',
}


def missing(path, name: str) -> LayoutError:
    """The error for ``name`` (``CLASSES_FILE``, ``LABELS_FILE`` or ``SPLIT_FILE``) absent at ``path``."""
    return LayoutError(path, f"missing ({_EXPECTED[name]})")


def _text(content: str | bytes, path) -> str:
    """UTF-8 ``content`` as text, line endings untranslated (as ``open(newline="")`` reads)."""
    if isinstance(content, str):
        return content
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LayoutError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_class_names(content: str | bytes, path) -> list[str]:
    """The class names of a ``classes.txt`` whose content is ``content`` (``path`` names it in errors)."""
    names = [line.strip() for line in _text(content, path).splitlines() if line.strip()]
    if len(names) < 2:
        raise LayoutError(path, f"{len(names)} class name(s); at least 2 are needed")
    return names


def class_names(root: str | os.PathLike) -> list[str]:
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise missing(path, CLASSES_FILE)
    return parse_class_names(path.read_bytes(), path)


def parse_split(content: str | bytes, path) -> tuple[frozenset[int], frozenset[int]]:
    """(training subjects, test subjects) of a ``split.json`` whose content is ``content``."""
    try:
        doc = json.loads(content.decode("utf-8") if isinstance(content, bytes) else content)
    except ValueError as exc:  # bytes that are not UTF-8 too, as read_split reads them
        raise LayoutError(path, f"not valid JSON ({exc})") from None
    sets = []
    for key in ("train_subjects", "test_subjects"):
        values = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
            raise LayoutError(path, f"{key} must be a non-empty list of subject ids (integers)")
        sets.append(frozenset(values))
    both = sets[0] & sets[1]
    if both:
        raise LayoutError(path, f"subject(s) {sorted(both)} are in both splits")
    return sets[0], sets[1]


def read_split(root: str | os.PathLike) -> tuple[frozenset[int], frozenset[int]]:
    """(training subjects, test subjects) of ``split.json``."""
    path = Path(root) / SPLIT_FILE
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise missing(path, SPLIT_FILE) from None
    except ValueError as exc:
        raise LayoutError(path, f"not valid JSON ({exc})") from None
    return parse_split(content, path)


def parse_labels(content: str | bytes, path, names: list[str], train: frozenset[int], test: frozenset[int],
                 root: str | os.PathLike) -> list[Clip]:
    """Every clip of a ``labels.csv`` whose content is ``content``, in file order, checked
    against the class ``names`` and the split (a subject in neither is an error). A clip's
    video and skeleton paths are under ``root`` (relative to a store's prefix when ``root``
    is ``""``)."""
    root = Path(root)
    clips: list[Clip] = []
    per_video: dict[str, int] = {}
    reader = csv.DictReader(io.StringIO(_text(content, path), newline=""))
    missing_columns = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing_columns:
        raise LayoutError(path, f"the header lacks column(s) {', '.join(missing_columns)}", 1)
    for row in reader:
        line = reader.line_num
        try:
            video_id = row["video_id"].strip()
            class_id, start, end, subject = (int(row[c]) for c in ("class", "start_frame", "end_frame",
                                                                   "subject_id"))
        except (TypeError, ValueError, AttributeError):
            raise LayoutError(path, "class, start_frame, end_frame and subject_id must be integers", line) from None
        if not video_id or "/" in video_id or video_id.startswith("."):
            raise LayoutError(path, f"bad video_id {video_id!r}", line)
        if class_id == NON_MICRO_GESTURE and len(names) < NON_MICRO_GESTURE:
            class_id = len(names)
        if not 1 <= class_id <= len(names):
            raise LayoutError(path, f"class {class_id} is not in 1..{len(names)} ({CLASSES_FILE})", line)
        if start < 0 or end < start:
            raise LayoutError(path, f"frames {start}..{end} are not a range", line)
        if subject not in train and subject not in test:
            raise LayoutError(path, f"subject {subject} is in neither split of {SPLIT_FILE}", line)
        per_video[video_id] = per_video.get(video_id, 0) + 1
        clips.append(Clip(f"{video_id}_{per_video[video_id]}", video_id, start, end, class_id - 1, subject,
                          root / VIDEO_DIR / f"{video_id}.mp4", root / SKELETON_DIR / video_id))
    if not clips:
        raise LayoutError(path, "no clip")
    return clips


def find_clips(root: str | os.PathLike) -> list[Clip]:
    """Every clip of ``labels.csv`` in file order, checked against ``classes.txt`` and
    ``split.json`` (a subject in neither split is an error). Video and skeleton paths are
    where they should be; whether the files exist is for the reader to say."""
    root = Path(root)
    names = class_names(root)
    train, test = read_split(root)
    path = root / LABELS_FILE
    if not path.is_file():
        raise missing(path, LABELS_FILE)
    return parse_labels(path.read_bytes(), path, names, train, test, root)


def in_train_split(clip: Clip, train_subjects: frozenset[int], protocol: str = "xsub") -> bool:
    if protocol != "xsub":
        raise ValueError(f"an iMiGUE-style dataset has only the xsub protocol, not {protocol!r}")
    return clip.subject in train_subjects


def read_clip_skeleton(clip: Clip):
    """float32 ``(T, 22, 2, 1)`` of the clip's frames (``openpose.read_openpose_dir``)."""
    from .openpose import read_openpose_dir

    return read_openpose_dir(clip.skeleton_dir, clip.start, clip.end)


def read_clip_video(clip: Clip, frames: int, size: int, threads: int | None = None):
    """uint8 ``(3, frames, size, size)`` of the clip's window of its video
    (``ntu.read_video_window``)."""
    from .ntu import read_video_window

    return read_video_window(clip.video, clip.start, clip.end, frames, size, threads=threads)
