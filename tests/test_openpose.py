"""The OpenPose (iMiGUE-style) skeleton reader: the 22-joint map, the main person, gaps
filled over time, absent frames, and clear errors for malformed files (issue 11, item 8)."""

import json

import numpy as np
import pytest

from robustact.models.data.ntu import EmptySkeletonError, SkeletonFormatError
from robustact.models.data.openpose import (BONES, JOINT_NAMES, JOINTS, read_openpose_dir, read_openpose_frame,
                                            read_openpose_frames)


def person(offset: float, confidence: float = 0.9, hands: bool = True) -> dict:
    """BODY_25 keypoint k at (offset + k, 2k); right-hand point h at (500 + h, offset),
    left-hand point h at (600 + h, offset)."""
    pose = [v for k in range(25) for v in (offset + k, 2.0 * k, confidence)]
    out = {"person_id": [-1], "pose_keypoints_2d": pose, "face_keypoints_2d": [0.0] * 210}
    if hands:
        out["hand_right_keypoints_2d"] = [v for h in range(21) for v in (500.0 + h, offset, confidence)]
        out["hand_left_keypoints_2d"] = [v for h in range(21) for v in (600.0 + h, offset, confidence)]
    return out


def frame(*people) -> str:
    return json.dumps({"version": 1.3, "people": list(people)})


def test_the_22_joints_come_from_body25_and_the_fingertips_of_the_main_person():
    assert JOINTS == len(JOINT_NAMES) == 22 and len(BONES) == 21
    assert {a for b in BONES for a in b} == set(range(22))  # a tree over every joint
    faint, main = person(1000.0, confidence=0.2), person(10.0)
    joints = read_openpose_frame(frame(faint, main), "f.json")
    assert joints.shape == (22, 3)
    body = [0, 1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18]
    assert joints[:12, 0].tolist() == [10.0 + k for k in body]
    assert joints[:12, 1].tolist() == [2.0 * k for k in body]
    assert joints[12:17, 0].tolist() == [504.0, 508.0, 512.0, 516.0, 520.0]  # right fingertips
    assert joints[17:, 0].tolist() == [604.0, 608.0, 612.0, 616.0, 620.0]
    assert read_openpose_frame(frame(), "empty.json") is None
    no_hands = read_openpose_frame(frame(person(0.0, hands=False)), "f.json")
    assert (no_hands[12:] == 0).all()


def test_gaps_are_filled_over_time_and_frames_without_anybody_are_absent():
    frames = [frame(person(float(10 * t))) for t in range(5)]
    doc = json.loads(frames[2])
    doc["people"][0]["pose_keypoints_2d"][0:3] = [0.0, 0.0, 0.0]  # the nose not found in frame 2
    frames[2] = json.dumps(doc)
    frames.insert(4, frame())  # nobody in frame 4 (of 6)
    skel = read_openpose_frames(frames)
    assert skel.shape == (6, 22, 2, 1) and skel.dtype == np.float32
    assert skel[2, 0, 0, 0] == pytest.approx(20.0) and skel[2, 0, 1, 0] == 0.0  # between frames 1 and 3
    assert (skel[4] == 0).all() and (skel[5] != 0).any()
    with pytest.raises(EmptySkeletonError, match="nobody detected in any of 2 frames"):
        read_openpose_frames([frame(), frame()], ["a.json", "b.json"])


@pytest.mark.parametrize("text,words", [
    ("{not json", "not valid JSON"),
    ('{"version": 1.3}', 'expected an object with a "people" list'),
    ('{"people": [3]}', "an entry of people is not an object"),
    ('{"people": [{}]}', "a person without pose_keypoints_2d"),
    (json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 74}]}), "holds 74 values; expected 75 (25 keypoints"),
    (json.dumps({"people": [{"pose_keypoints_2d": ["a"] * 75}]}), "not a number"),
    ('{"people": [{"pose_keypoints_2d": [' + ",".join(["NaN"] * 75) + "]}]}", "NaN or infinite"),
])
def test_malformed_frames_name_the_file_and_the_problem(text, words):
    with pytest.raises(SkeletonFormatError) as info:
        read_openpose_frame(text, "clips/0298/0298_000000000007_keypoints.json")
    assert words in str(info.value) and "0298_000000000007_keypoints.json" in str(info.value)


def test_a_video_directory_is_read_over_a_frame_range(tmp_path):
    video = tmp_path / "0298"
    video.mkdir()
    for f in (3, 4, 6, 7):
        (video / f"0298_{f:012d}_keypoints.json").write_text(frame(person(float(f))))
    skel = read_openpose_dir(video, 3, 6)
    assert skel.shape == (4, 22, 2, 1)
    assert skel[:, 0, 0, 0].tolist() == [3.0, 4.0, 0.0, 6.0]  # frame 5 has no file: absent
    assert read_openpose_dir(video).shape[0] == 5
    with pytest.raises(SkeletonFormatError, match="no \\*_<frame>_keypoints.json file"):
        read_openpose_dir(tmp_path)


def test_a_frame_range_beyond_the_files_is_refused_not_allocated(tmp_path):
    """A labels row of frames 0..10**12 (careless or hostile) is an error naming the files'
    range, before anything is allocated per frame."""
    import pytest as _pytest

    from robustact.models.data.ntu import SkeletonFormatError
    from robustact.models.data.openpose import read_openpose_dir

    directory = tmp_path / "v"
    directory.mkdir()
    for f in (3, 4, 5):
        (directory / f"v_{f:012d}_keypoints.json").write_text('{"people": []}')
    with _pytest.raises(SkeletonFormatError, match=r"frame range 0..1000000000000 reaches beyond .* frames 3..5"):
        read_openpose_dir(directory, 0, 10**12)
