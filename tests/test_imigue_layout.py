"""The iMiGUE-style layout: labels CSV, classes, subject split, clip names, skeleton reading
over a clip's frame range, and errors naming the file and line (issue 11, item 8)."""

import json

import pytest

from robustact.models.data.imigue import LayoutError, class_names, find_clips, in_train_split, read_clip_skeleton, read_split
from tests.test_openpose import frame, person


def write_root(root, rows, classes=("turtle neck", "deep breath", "illustrative"), split=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "split.json").write_text(json.dumps(split or {"train_subjects": [2, 4], "test_subjects": [1]}))
    (root / "labels.csv").write_text("video_id,label_id,class,start_frame,end_frame,subject_id\n"
                                     + "".join(f"{r}\n" for r in rows))
    return root


def test_clips_names_labels_and_split(tmp_path):
    root = write_root(tmp_path / "r", ["0001,1,1,0,9,2", "0001,2,99,10,20,2", "0002,3,2,5,8,1"])
    clips = find_clips(root)
    assert [c.name for c in clips] == ["0001_1", "0001_2", "0002_1"]
    assert [c.label for c in clips] == [0, 2, 1]  # 99 (non-micro-gesture) is the last class
    assert (clips[0].start, clips[0].end, clips[0].subject) == (0, 9, 2)
    assert clips[2].video == root / "videos" / "0002.mp4" and clips[2].skeleton_dir == root / "skeleton" / "0002"
    train, test = read_split(root)
    assert [in_train_split(c, train) for c in clips] == [True, True, False]
    assert class_names(root)[2] == "illustrative"
    with pytest.raises(ValueError, match="only the xsub protocol"):
        in_train_split(clips[0], train, "xview")


@pytest.mark.parametrize("rows,split,words", [
    (["0001,1,7,0,9,2"], None, "line 2: class 7 is not in 1..3"),
    (["0001,1,1,9,3,2"], None, "line 2: frames 9..3 are not a range"),
    (["0001,1,1,0,x,2"], None, "line 2: class, start_frame, end_frame and subject_id must be integers"),
    (["0001,1,1,0,9,5"], None, "subject 5 is in neither split"),
    (["../x,1,1,0,9,2"], None, "bad video_id '../x'"),
    ([], None, "no clip"),
    (["0001,1,1,0,9,2"], {"train_subjects": [2], "test_subjects": [2]}, "subject(s) [2] are in both splits"),
    (["0001,1,1,0,9,2"], {"train_subjects": [], "test_subjects": [1]}, "train_subjects must be a non-empty list"),
])
def test_layout_errors_name_the_file_and_line(tmp_path, rows, split, words):
    root = write_root(tmp_path / "r", rows, split=split)
    with pytest.raises(LayoutError) as info:
        find_clips(root)
    assert words in str(info.value)


def test_missing_files_and_header(tmp_path):
    with pytest.raises(LayoutError, match="classes.txt: missing"):
        find_clips(tmp_path)
    root = write_root(tmp_path / "r", ["0001,1,1,0,9,2"])
    (root / "labels.csv").write_text("video,class\n0001,1\n")
    with pytest.raises(LayoutError, match="line 1: the header lacks column"):
        find_clips(root)
    (root / "split.json").write_text("{oops")
    with pytest.raises(LayoutError, match="split.json: not valid JSON"):
        find_clips(root)


def test_a_clip_skeleton_is_its_frame_range(tmp_path):
    root = write_root(tmp_path / "r", ["0007,1,2,3,5,1"])
    video = root / "skeleton" / "0007"
    video.mkdir(parents=True)
    for f in range(0, 9):
        (video / f"0007_{f:012d}_keypoints.json").write_text(frame(person(float(f))))
    clip = find_clips(root)[0]
    skel = read_clip_skeleton(clip)
    assert skel.shape == (3, 22, 2, 1) and skel[:, 0, 0, 0].tolist() == [3.0, 4.0, 5.0]


def test_a_clip_video_is_its_frame_window(tmp_path):
    """Frames first..last of a longer video, sampled as a whole clip would be."""
    import av
    import numpy as np

    from robustact.models.data.ntu import VideoDecodeError, read_video_window

    path = tmp_path / "0007.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(20):
            image = np.full((32, 32, 3), 10 * i + 5, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    clip = read_video_window(path, 4, 10, frames=3, size=16)
    assert clip.shape == (3, 3, 16, 16) and clip.dtype == np.uint8
    levels = clip.reshape(3, 3, -1).mean(axis=(0, 2))
    assert np.allclose(levels, [45, 75, 105], atol=4), levels  # frames 4, 7 and 10
    with pytest.raises(VideoDecodeError, match="the video has 20 frames; the clip asks for frames 15..25"):
        read_video_window(path, 15, 25, frames=3, size=16)
    # and through the layout: a clip of the labels CSV reads its own window
    from robustact.models.data.imigue import read_clip_video

    root = write_root(tmp_path / "r", ["0007,1,2,4,10,1"])
    (root / "videos").mkdir()
    path.rename(root / "videos" / "0007.mp4")
    assert np.array_equal(read_clip_video(find_clips(root)[0], 3, 16), clip)
