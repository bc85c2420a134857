"""End to end over HTTP, on both backends, with a real Celery worker process:
register a synthetic dataset → train (tiny, 1 epoch, AMR) → evaluate (FGSM + PGD in R, S,
RS) → fetch the report and a comparison → classify an uploaded clip."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from robustact.models.data import ntu
from tests.service.conftest import dataset_location

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _register(svc, backend, root) -> dict:
    # On the servers backend the dataset lives in S3 too: the worker downloads it once into its cache.
    r = svc.client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic",
                                              "location": dataset_location(svc, backend, root)})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_train_evaluate_report_classify(backend, live_service, synthetic_root, request):
    t0 = time.monotonic()
    svc = live_service(backend)
    c = svc.client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"database", "broker", "store", "workers"}
    assert ready.json()["checks"]["workers"].startswith("ok (1 alive: test-0-")

    dataset = _register(svc, backend, synthetic_root)
    assert dataset["num_classes"] == 3 and dataset["class_names"] == ntu.class_names(synthetic_root)
    assert dataset["splits"]["xsub"] == {"train": 18, "test": 6}
    assert c.get(f"/v1/datasets/{dataset['id']}").json()["id"] == dataset["id"]
    assert c.get("/v1/datasets/tiny3").json()["id"] == dataset["id"]  # by name too

    r = c.post("/v1/jobs", json={"kind": "train", "dataset_id": "tiny3", "defence": "amr", "num_amr": 1,
                                 "preset": "tiny", "epochs": 1, "batch_size": 6, "attack": {"steps": 2},
                                 "name": "amr-tiny"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.json()["status"] == "queued"
    train = svc.wait_job(r.json()["id"])
    assert train["status"] == "succeeded", (train, svc.worker_logs())
    assert train["attempts"] == 1 and train["progress"]["phase"] == "done"
    assert train["timings"]["running_seconds"] > 0
    assert train["params"]["model_config"]["num_amr"] == 1
    model_id = train["outputs"]["model_id"]
    t_train = time.monotonic()

    model = c.get(f"/v1/models/{model_id}").json()
    assert model["name"] == "amr-tiny" and model["num_amr"] == 1 and model["defence"] == "amr"
    assert sorted(model["files"]) == ["config.json", "model.safetensors"]
    config = c.get(f"/v1/models/{model_id}/files/config.json")
    assert config.status_code == 200 and config.json()["class_names"] == dataset["class_names"]
    weights = c.get(f"/v1/models/{model_id}/files/model.safetensors")
    assert weights.status_code == 200 and len(weights.content) > 1000
    if backend == "servers":
        presigned = c.get(f"/v1/models/{model_id}/files/config.json", params={"presign": True},
                          follow_redirects=False)
        assert presigned.status_code == 307
        import httpx

        assert httpx.get(presigned.headers["location"]).json() == config.json()

    r = c.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "attacks": ["fgsm", "pgd3"],
                                 "modes": ["R", "S", "RS"], "eps": [8], "batch_size": 6})
    assert r.status_code == 202, r.text
    evaluation = svc.wait_job(r.json()["id"])
    assert evaluation["status"] == "succeeded", (evaluation, svc.worker_logs())
    report_id = evaluation["outputs"]["report_id"]
    t_eval = time.monotonic()

    report = c.get(f"/v1/reports/{report_id}").json()
    assert report["schema"] == "robustact.report/v2"
    assert report["dataset"]["num_samples"] == 6 and report["dataset"]["split"] == "test"
    assert {a["label"] for a in report["attacks"]} == {"FGSM", "PGD3"}
    clean = report["clean"]["accuracy"]
    worst = report["worst_case"][0]
    for entry in report["attacks"]:
        assert set(entry["modes"]) == {"R", "S", "RS"}
        for mode, result in entry["modes"].items():
            assert worst["modes"][mode]["accuracy"] <= result["accuracy"] <= clean
    assert "flags" in report["diagnostics"] and report["per_clip"]["file"] == "clips.npz"
    # The per-clip records, as npz (no pickle) and as JSON; the report's numbers come from them.
    from robustact.models.evaluate import ClipRecords

    npz = c.get(f"/v1/reports/{report_id}/clips")
    assert npz.status_code == 200 and npz.headers["content-type"] == "application/octet-stream"
    records = ClipRecords.load(io.BytesIO(npz.content))
    assert len(records) == 6 and 100.0 * records.clean_correct.mean() == pytest.approx(clean)
    assert (records.outcome[~records.clean_correct] == -1).all()
    as_json = c.get(f"/v1/reports/{report_id}/clips", params={"format": "json"}).json()
    assert as_json["outcome"] == records.outcome.tolist() and as_json["suite"] == report["config"]["suite"]

    # AutoAttack's attacks as a cascade, with restarts: same rules, worst case only.
    r = c.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "attacks": ["apgd-ce3", "apgd-dlr3",
                                 "square10"], "modes": ["RS"], "eps": [8], "batch_size": 6, "restarts": 2,
                                 "strategy": "worst-case"})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["strategy"] == "worst-case"
    cascade = svc.wait_job(r.json()["id"])
    assert cascade["status"] == "succeeded", (cascade, svc.worker_logs())
    aa = c.get(f"/v1/reports/{cascade['outputs']['report_id']}").json()
    assert aa["config"]["strategy"] == "worst-case"
    assert [a["label"] for a in aa["attacks"]] == ["APGD-CE3x2", "APGD-DLR3x2", "Square10x2"]
    assert aa["worst_case"][0]["overall"]["accuracy"] <= clean
    for bad, field in ((["square0"], "attacks"), (["deepfool"], "attacks")):
        r = c.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "attacks": bad})
        assert r.status_code == 422 and field in r.text, r.text
    r = c.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "strategy": "fastest"})
    assert r.status_code == 422 and "strategy" in r.text
    cascade_report = cascade["outputs"]["report_id"]
    assert c.get(f"/v1/models/{model_id}").json()["report_ids"] == [report_id, cascade_report]
    listed = c.get("/v1/reports", params={"model_id": model_id}).json()["items"]
    assert [x["id"] for x in listed] == [report_id, cascade_report]

    table = c.get("/v1/reports/compare", params={"ids": [report_id, report_id], "baseline": report_id,
                                                "attack": "PGD3"})
    assert table.status_code == 200, table.text
    rows = table.json()["rows"]
    assert len(rows) == 2 and rows[0]["ri"] == 0.0
    text = c.get("/v1/reports/compare", params={"ids": report_id, "attack": "FGSM", "format": "text"})
    assert "RI against" in text.text
    cli_copy = {**report, "model": {**report["model"], "name": "cli-copy"}}  # as `robustact evaluate` writes
    r = c.post("/v1/reports/compare", json={"report_ids": [report_id], "reports": [cli_copy], "attack": "FGSM"})
    assert r.status_code == 200, r.text
    assert [row["ri"] for row in r.json()["rows"]] == [0.0, 0.0] and r.json()["rows"][1]["name"] == "cli-copy"

    sample = "S001C001P003R001A002"  # subject 3: a test-split clip of class 2
    video = (synthetic_root / ntu.RGB_DIR / f"{sample}{ntu.VIDEO_SUFFIX}").read_bytes()
    skeleton = (synthetic_root / ntu.SKELETON_DIR / f"{sample}{ntu.SKELETON_SUFFIX}").read_bytes()
    r = c.post(f"/v1/models/{model_id}/classify", data={"top_k": "2"},
               files={"video": (f"{sample}_rgb.avi", video, "application/octet-stream"),
                      "skeleton": (f"{sample}.skeleton", skeleton, "application/octet-stream")})
    assert r.status_code == 200, r.text
    result = r.json()
    assert len(result["top"]) == 2 and result["top"][0]["probability"] >= result["top"][1]["probability"]
    assert result["top"][0]["name"] in dataset["class_names"]
    assert result["timings_ms"]["total"] > 0 and result["inputs"]["skeleton"]["joints"] == 25

    # The same clip as a T×V×3 .npy (first body) gives a valid answer too.
    array = ntu.read_skeleton_text(skeleton.decode(), sample)[..., 0]
    buffer = io.BytesIO()
    np.save(buffer, array)
    r = c.post(f"/v1/models/{model_id}/classify",
               files={"video": ("clip.avi", video, "video/x-msvideo"),
                      "skeleton": ("clip.npy", buffer.getvalue(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert len(r.json()["top"]) == 3

    log = c.get(f"/v1/jobs/{train['id']}/log")
    assert log.status_code == 200 and "attempt 1" in log.text
    jobs = c.get("/v1/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert jobs["total"] == 3 and len(jobs["items"]) == 1 and jobs["items"][0]["kind"] == "evaluate"

    if backend == "servers":  # artefacts are in S3 and rows in Postgres, nothing registered half-way
        from robustact.service.store import open_store

        store = open_store(svc.settings.store_url, svc.settings.s3_endpoint_url)
        keys = store.list("")
        assert f"models/{model_id}/model.safetensors" in keys
        assert f"reports/{report_id}/report.json" in keys and f"reports/{report_id}/clips.npz" in keys
        assert not [k for k in keys if "/last-" in k]  # epoch checkpoints removed after success
        assert json.loads(store.get_bytes(f"reports/{report_id}/report.json")) == report
    print(f"\n[{backend}] train {t_train - t0:.1f}s, evaluate {t_eval - t_train:.1f}s, "
          f"total {time.monotonic() - t0:.1f}s")


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_imigue_layout_train_evaluate_classify_with_openpose_json(backend, live_service, tmp_path_factory):
    """The iMiGUE-style layout over HTTP with a real worker: register (from S3 on the servers
    backend) → train a 2-D, 22-joint fusion model with an AMR → evaluate in R, S, RS (ε_S in
    pixels) → classify a clip's video with its OpenPose frames as JSON."""
    from robustact.models.data import imigue
    from robustact.models.data.synth_imigue import synthesize_imigue

    root = tmp_path_factory.mktemp("imigue") / "mini-imigue"
    synthesize_imigue(root, num_classes=4, subjects=(1, 3), sessions=2, frames=12, video_size=(48, 36), objects=2)
    svc = live_service(backend)
    c = svc.client
    r = c.post("/v1/datasets", json={"name": "mini-imigue", "format": "imigue",
                                     "location": dataset_location(svc, backend, root)})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["layout"] == "imigue" and dataset["geometry"] == {"joints": 22, "skel_channels": 2, "persons": 1}
    assert dataset["splits"] == {"xsub": {"train": 8, "test": 8}}

    r = c.post("/v1/jobs", json={"kind": "train", "dataset_id": "mini-imigue", "defence": "amr", "num_amr": 1,
                                 "preset": "tiny", "epochs": 1, "batch_size": 4, "attack": {"steps": 1}})
    assert r.status_code == 202, r.text
    train = svc.wait_job(r.json()["id"])
    assert train["status"] == "succeeded", (train, svc.worker_logs())
    model_id = train["outputs"]["model_id"]
    config = c.get(f"/v1/models/{model_id}/files/config.json").json()
    assert {k: config["model"][k] for k in ("joints", "skel_channels", "persons")} == dataset["geometry"]
    assert len(config["normalisation"]["skel_min"]) == 2  # pixels, x and y

    r = c.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "attacks": ["pgd2"],
                                 "modes": ["R", "S", "RS"], "eps": [8], "batch_size": 4})
    assert r.status_code == 202, r.text
    evaluation = svc.wait_job(r.json()["id"])
    assert evaluation["status"] == "succeeded", (evaluation, svc.worker_logs())
    report = c.get(f"/v1/reports/{evaluation['outputs']['report_id']}").json()
    assert report["dataset"]["num_samples"] == 8
    worst = report["worst_case"][0]
    assert worst["overall"]["accuracy"] <= report["clean"]["accuracy"] and len(worst["eps_skel_pixels"]) == 2

    clip = next(cl for cl in imigue.find_clips(root) if cl.subject == 3)
    frames = [json.loads((clip.skeleton_dir / f"{clip.video_id}_{f:012d}_keypoints.json").read_text())
              for f in range(clip.start, clip.end + 1)]
    r = c.post(f"/v1/models/{model_id}/classify", data={"top_k": "2"},
               files={"video": (f"{clip.video_id}.mp4", clip.video.read_bytes(), "video/mp4"),
                      "skeleton": (f"{clip.name}.json", json.dumps(frames).encode(), "application/json")})
    assert r.status_code == 200, r.text
    assert r.json()["inputs"]["skeleton"] == {"frames": 12, "resampled_to": 16, "joints": 22, "bodies": 1}
    assert r.json()["top"][0]["name"] in dataset["class_names"]
