"""The iMiGUE-style layout through the whole pipeline (issue 11, item 8): a synthetic set in
that layout (OpenPose JSON per frame, labelled clips of session videos), prepared into a
2-D, 22-joint, one-body cache, in one go and in pieces, then CLI train and evaluate; and the
held objects that make the synthetic classes need the video (item 9)."""

import csv
import json

import numpy as np
import pytest

from robustact.models.data import cache, imigue, layouts, openpose
from robustact.models.data.synth import OBJECTS, _render, _sample_skeletons, class_table
from robustact.models.data.synth_imigue import GAP_FRAMES, UPPER_BODY_MOTIONS, synthesize_imigue
from robustact.models.data.ntu import SampleId
from robustact.service.cli import _check_sizes
from tests.test_e2e_cli import run

FRAMES, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES = 12, 4, 16, 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("imigue") / "raw"
    summary = synthesize_imigue(out, num_classes=4, subjects=(1, 3), sessions=2, frames=FRAMES, objects=2)
    assert summary["num_samples"] == 2 * 2 * 4
    return out


@pytest.fixture(scope="module")
def prepared(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("imigue-cache") / "cache"
    return out, cache.prepare(root, out, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1)


def test_the_synthetic_set_is_read_back_by_the_layout_reader(root):
    clips = imigue.find_clips(root)
    assert len(clips) == 16 and layouts.detect(root) is layouts.IMIGUE
    names = imigue.class_names(root)
    assert names == [n for n, _, _ in class_table(4, 2, UPPER_BODY_MOTIONS)]
    assert names[1] == "wave right hand holding a long stick"
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["class"] for r in rows} == {"1", "2", "3", "99"}  # the last class written as iMiGUE's 99
    assert sorted({c.label for c in clips}) == [0, 1, 2, 3]
    train, test = imigue.read_split(root)
    assert (train, test) == ({1}, {3})
    per_video = {}
    for clip in clips:
        per_video.setdefault(clip.video_id, []).append(clip)
    assert sorted(per_video) == ["0001_01", "0001_02", "0003_01", "0003_02"]
    for video_id, video_clips in per_video.items():
        # every class once per session, separated by still frames
        assert sorted(c.label for c in video_clips) == [0, 1, 2, 3]
        starts = sorted(c.start for c in video_clips)
        assert starts == [k * (FRAMES + GAP_FRAMES) for k in range(4)]
        files = list((root / "skeleton" / video_id).glob("*_keypoints.json"))
        assert len(files) == 4 * (FRAMES + GAP_FRAMES)
    skel = imigue.read_clip_skeleton(clips[0])
    assert skel.shape == (FRAMES, openpose.JOINTS, 2, 1) and np.all(skel != 0)
    nose, neck = skel[:, 0, :, 0], skel[:, 1, :, 0]
    assert np.all(nose[:, 1] < neck[:, 1])  # image y grows downwards: the head is above the neck
    video = imigue.read_clip_video(clips[0], RGB_FRAMES, RGB_SIZE)
    assert video.shape == (3, RGB_FRAMES, RGB_SIZE, RGB_SIZE)
    doc = json.loads(next(iter((root / "skeleton" / "0001_01").glob("*.json"))).read_text())
    person = max(doc["people"], key=lambda p: sum(p["pose_keypoints_2d"][2::3]))
    assert len(person["pose_keypoints_2d"]) == 75 and len(person["hand_right_keypoints_2d"]) == 63
    assert person["pose_keypoints_2d"][3 * 10 + 2] == 0  # the right knee is behind the desk: not found


def test_prepare_records_the_layout_and_the_2d_geometry(root, prepared):
    cache_dir, meta = prepared
    assert (meta["layout"], meta["joints"], meta["skel_channels"], meta["persons"]) == ("imigue", 22, 2, 1)
    assert meta["arrays"]["skel"]["shape"] == [16, 2, SKEL_FRAMES, 22, 1]
    assert meta["splits"] == {"xsub": {"train": 8, "test": 8}}
    assert len(meta["skel_min"]) == len(meta["skel_max"]) == 2 and meta["skel_range_source"] == "xsub-train"
    full = json.loads((cache_dir / "meta.json").read_text())
    assert full["samples"][0]["name"] == imigue.find_clips(root)[0].name
    assert {"video_id", "start_frame", "end_frame", "subject", "xsub_train"} <= set(full["samples"][0])
    data = cache.ClipDataset(cache_dir, "xsub", "test")
    assert len(data) == 8 and set(data.sample_names) == {c.name for c in imigue.find_clips(root) if c.subject == 3}
    rgb, skel, label = data[0]
    assert tuple(rgb.shape) == (3, RGB_FRAMES, RGB_SIZE, RGB_SIZE) and tuple(skel.shape) == (2, SKEL_FRAMES, 22, 1)
    assert 0.0 <= float(skel.min()) and float(skel.max()) <= 1.0 and layouts.cache_geometry(data.meta) == {
        "joints": 22, "skel_channels": 2, "persons": 1}
    with pytest.raises(ValueError, match="protocol.*xsub, not 'xview'"):
        cache.ClipDataset(cache_dir, "xview", "test")
    with pytest.raises(ValueError, match="3 skel_min .* 2 coordinates per joint .* another layout"):
        cache.ClipDataset(cache_dir, "xsub", "test", normalisation={"skel_min": [0, 0, 0], "skel_max": [1, 1, 1]})
    # A model's own constants rescale the clips exactly as its cache did.
    other = {"skel_min": [v - 10 for v in meta["skel_min"]], "skel_max": [v + 10 for v in meta["skel_max"]]}
    rescaled = cache.ClipDataset(cache_dir, "xsub", "test", normalisation=other)[0][1]
    assert not np.allclose(rescaled.numpy(), skel.numpy())


def test_an_imigue_prepare_in_pieces_writes_the_same_cache(root, prepared, tmp_path):
    cache_dir, meta = prepared
    names = [s.name for s in layouts.find_samples(root)]
    arrays, sizes = {}, 0
    out = tmp_path / "assembled"
    for k, piece in enumerate((names[0::2], names[1::2])):
        reasons = cache.decode_samples(root, out / "clips", piece, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)
        assert set(reasons.values()) == {None}
        for name in piece:
            arrays[name] = cache.clip_arrays(out / "clips" / f"{name}.npz")
            sizes += (out / "clips" / f"{name}.npz").stat().st_size
    cache.assemble_cache(root, out, arrays.__getitem__, {}, sizes, RGB_FRAMES, RGB_SIZE, SKEL_FRAMES)
    assert cache.cache_digest(out) == cache.cache_digest(cache_dir)


def test_a_missing_openpose_directory_skips_the_clip_with_its_reason(root, tmp_path):
    import shutil
    import warnings

    copy = tmp_path / "raw"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "skeleton" / "0003_02")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = cache.prepare(copy, tmp_path / "cache", RGB_FRAMES, RGB_SIZE, SKEL_FRAMES, workers=1)
    assert meta["num_samples"] == 12
    assert {s["reason"] for s in meta["skipped"]} == {"no OpenPose directory"}
    assert {s["name"] for s in meta["skipped"]} == {f"0003_02_{k}" for k in range(1, 5)}
    assert any("0003_02_1" in str(w.message) for w in caught)


def test_cli_trains_and_evaluates_a_2d_model_and_refuses_the_other_layout(tmp_path):
    from robustact.models.checkpoint import load_checkpoint
    from robustact.models.config import preset_config
    from robustact.models.report import load_report

    # at the tiny preset's geometry (the module's cache is smaller still)
    run("data", "synth", "--layout", "imigue", "--out", tmp_path / "raw", "--classes", 4, "--objects", 2,
        "--subjects", "1,3", "--sessions", 1, "--frames", FRAMES)
    run("data", "prepare", tmp_path / "raw", "--out", tmp_path / "cache", "--workers", 1)
    run("train", "--data", tmp_path / "cache", "--out", tmp_path / "run", "--defence", "amr", "--num-amr", 1,
        "--epochs", 1, "--batch-size", 4, "--attack-steps", 1)
    _, saved = load_checkpoint(tmp_path / "run" / "model")
    assert {k: saved["model"][k] for k in ("joints", "skel_channels", "persons")} == {
        "joints": 22, "skel_channels": 2, "persons": 1}
    assert len(saved["normalisation"]["skel_min"]) == 2
    text = run("evaluate", "--model", tmp_path / "run" / "model", "--data", tmp_path / "cache", "--out",
               tmp_path / "r.json", "--attacks", "pgd2", "--modes", "S,RS")
    report = load_report(tmp_path / "r.json")
    assert report["dataset"]["num_samples"] == 4  # subject 3, one session, every class once
    # ε_S in pixels of the source video per axis (x, y): 2-D keypoints are not in metres
    span = [hi - lo for lo, hi in zip(saved["normalisation"]["skel_min"], saved["normalisation"]["skel_max"])]
    worst = report["worst_case"][0]
    assert "eps_skel_metres" not in worst and worst["eps_skel_pixels"] == pytest.approx(
        [worst["eps_skel"] * s for s in span], abs=1e-5)
    assert "pixels along x / y of the source video" in text
    # A 3-D NTU model is refused on this cache with a one-line reason, and the other way round.
    ntu_cfg = preset_config("tiny", num_classes=4)
    with pytest.raises(ValueError, match="22 joints × 2 coordinates × 1 bodies but the model takes 25 × 3 × 2"):
        _check_sizes(json.loads((tmp_path / "cache" / "meta.json").read_text()), ntu_cfg)


def test_held_objects_are_drawn_in_the_video_only_near_the_right_hand():
    table = class_table(6, 2)
    assert [(m, o) for _, m, o in table] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert table[3][0] == "raise both arms holding a long stick" and OBJECTS[0] == ""
    with pytest.raises(ValueError, match="num_classes must be in 2..24 with objects=2"):
        class_table(25, 2)
    sid = SampleId(1, 1, 1, 1, 2)
    bodies = _sample_skeletons(sid, 10, 0, np.random.default_rng(5), motion=0)
    colour, held_colour = np.array([255, 40, 40], np.float32), np.array([0, 230, 230], np.float32)
    plain = np.stack(list(_render(bodies, 64, 48, colour, np.random.default_rng(7))))
    for kind in (1, 2):
        held = np.stack(list(_render(bodies, 64, 48, colour, np.random.default_rng(7), np.full(10, kind),
                                     held_colour)))
        changed = np.abs(held.astype(int) - plain.astype(int)).max(axis=3) > 0  # (T, h, w)
        assert changed.any(axis=(1, 2)).all()  # every frame shows the object
        from robustact.models.data.synth import _project

        hand = _project(bodies[0][:, 11], 64, 48)  # (T, 2)
        reach = 1.1 * 48 * (0.95 + 0.1 + 0.45) / bodies[0][:, 11, 2] + 3  # stick or ball, with outline
        yy, xx = np.nonzero(changed[0])
        assert np.all(np.hypot(xx - hand[0, 0], yy - hand[0, 1]) <= reach[0])


def test_clutter_scales_the_background_and_zero_is_a_flat_noisy_wall():
    from robustact.models.data.synth import _background

    flat = _background(np.random.default_rng(3), 4, 64, 48, clutter=0.0)(0, 4)
    full = _background(np.random.default_rng(3), 4, 64, 48, clutter=1.0)(0, 4)
    assert abs(float(flat.mean()) - 110) < 1 and 5 < float(flat.std()) < 7  # grey plus σ = 6 sensor noise
    assert float(full.std()) > 3 * float(flat.std())
    half = _background(np.random.default_rng(3), 4, 64, 48, clutter=0.5)(0, 4)
    assert float(flat.std()) < float(half.std()) < float(full.std())
    with pytest.raises(ValueError, match="clutter must be in 0..1"):
        from robustact.models.data.synth import synthesize

        synthesize("/nonexistent-never-written", clutter=2.0)
