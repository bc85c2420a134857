"""Skeleton uploads as OpenPose JSON (``service.decoder.decode``, in this process): the two
document forms decode to the model input that the same frames read as in training give,
every malformed upload is a 422 naming the problem and its frame, and the frame limit is
enforced while the frames are read."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from robustact.models.data.openpose import read_openpose_frames
from robustact.service.decoder import SKELETON, DecodeError, Geometry, Limits, decode
from tests.test_openpose import person

# A 2-D 22-joint single-body model (iMiGUE-style), normalised to a 1920×1080 image.
GEOMETRY_2D = Geometry(rgb_frames=8, rgb_size=32, skel_frames=16, joints=22, persons=1,
                       skel_min=(0.0, 0.0), skel_max=(1920.0, 1080.0), skel_channels=2)
LIMITS = Limits(max_skeleton_frames=100)


def frames(count: int = 2) -> list[dict]:
    """``count`` OpenPose frames of one person drifting right, a faint second person in each."""
    return [{"version": 1.3, "people": [person(100.0 + 10 * t, confidence=0.2), person(300.0 + 10 * t)]}
            for t in range(count)]


def upload(document, suffix: str = ".json", geometry: Geometry = GEOMETRY_2D, limits: Limits = LIMITS):
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    return decode(SKELETON, io.BytesIO(data), suffix, "pose.json", "skeleton", geometry, limits)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def refusal(document, **options) -> str:
    with pytest.raises(DecodeError) as info:
        upload(document, **options)
    assert info.value.status == 422 and info.value.field == "skeleton"
    return info.value.message


def test_a_json_array_of_frames_decodes_as_the_training_reader_reads_them():
    skel, inputs = upload(frames(2))
    assert skel.shape == GEOMETRY_2D.shape(SKELETON) == (2, 16, 22, 1) and skel.dtype == np.float32
    assert 0 <= skel.min() and skel.max() <= 1 and skel.any()
    assert inputs == {"frames": 2, "resampled_to": 16, "joints": 22, "bodies": 1}
    # The same frames through read_openpose_frames (main person, gaps filled), sent as .npy.
    as_trained = read_openpose_frames([json.dumps(f) for f in frames(2)])
    expected, _ = upload(npy(as_trained), suffix=".npy")
    np.testing.assert_array_equal(skel, expected)
    assert skel[0, 0, 0, 0] == pytest.approx(300.0 / 1920.0)  # the nose of the main person, not the faint one


def test_an_object_with_a_frames_array_decodes_the_same():
    expected, _ = upload(frames(3))
    skel, inputs = upload({"frames": frames(3), "fps": 25, "source": "openpose 1.3"})
    np.testing.assert_array_equal(skel, expected)
    assert inputs["frames"] == 3
    # Whitespace, a byte-order mark and a first frame with nobody in it are fine too.
    text = "\ufeff" + json.dumps({"frames": [{"people": []}, *frames(2)]}, indent=2)
    skel, inputs = upload(text.encode())
    assert inputs["frames"] == 3 and skel.shape == (2, 16, 22, 1)


def _with(index: int, key: str, value) -> list[dict]:
    document = frames(4)
    document[index]["people"][1][key] = value
    return document


@pytest.mark.parametrize("document,words", [
    (b'[{"people": []}, {"people": [}]', "not valid JSON: Expecting value (line 1, column 30)"),
    (b"[" + json.dumps(frames(1)[0]).encode() + b" {}]", "not valid JSON: Expecting ',' delimiter (line 1, column"),
    (b"\xff\xfe[]", "not UTF-8 text"),
    ({"people": []}, 'expected a JSON array of OpenPose frames, or an object with a "frames" array'),
    ({"frames": 5}, 'or an object with a "frames" array'),
    (b'"frames"', 'or an object with a "frames" array'),
    ([*frames(2), "a frame"], 'frame 2: not an OpenPose frame: expected an object with a "people" list'),
    (_with(3, "pose_keypoints_2d", [1.0] * 72),
     "frame 3: pose_keypoints_2d holds 72 values; expected 75 (25 keypoints × x, y, confidence"),
    (_with(1, "hand_left_keypoints_2d", [1.0] * 60), "frame 1: hand_left_keypoints_2d holds 60 values; expected 63"),
    (_with(2, "pose_keypoints_2d", [float("nan")] * 75), "frame 2: pose_keypoints_2d holds NaN or infinite values"),
    (_with(0, "pose_keypoints_2d", [1e39] * 75), "the number 1e+39 is beyond the float32 range"),
    (b'[{"people": [{"pose_keypoints_2d": [' + b",".join([b"9" * 400] * 75) + b"]}]}]",
     "the number 999999999999999999999999999999 is beyond the float32 range"),
    (b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "nested too deeply"),
    ([{"people": []}] * 3, "'pose.json': nobody detected in any of 3 frames"),
    ([], "it holds no frames"),
    ({"frames": []}, "it holds no frames"),
    (b"[] []", "not valid JSON: Extra data (line 1, column 4)"),
])
def test_malformed_uploads_are_422_naming_the_problem_and_the_frame(document, words):
    assert words in refusal(document)


def test_a_hand_that_is_a_number_is_422_not_a_crash():
    document = frames(2)
    document[0]["people"][1]["hand_right_keypoints_2d"] = 5
    assert "frame 0: hand_right_keypoints_2d is a float, not a list of numbers" in refusal(document)


def test_the_frame_limit_is_enforced_before_any_frame_is_decoded():
    assert upload(frames(3), limits=Limits(max_skeleton_frames=3))[1]["frames"] == 3
    words = "'pose.json': 4 frames is above the 3-frame limit"
    assert words in refusal(frames(4), limits=Limits(max_skeleton_frames=3))
    assert words in refusal({"frames": frames(4)}, limits=Limits(max_skeleton_frames=3))
    # Refused before reading frames: the malformed frame after the limit is never looked at.
    assert words in refusal([*frames(3), {"people": 5}], limits=Limits(max_skeleton_frames=3))


def test_a_json_skeleton_for_a_3d_model_is_a_coordinate_mismatch():
    ntu = Geometry(rgb_frames=8, rgb_size=32, skel_frames=16, joints=25, persons=2,
                   skel_min=(-1.5, -1.5, 1.5), skel_max=(1.5, 1.5, 4.5))
    assert "2 coordinates per joint; this model expects 3 (x, y, z)" in refusal(frames(2), geometry=ntu)
    two_d = Geometry(**{**GEOMETRY_2D.__dict__, "joints": 25})
    assert "22 joints per body; this model expects 25" in refusal(frames(2), geometry=two_d)
