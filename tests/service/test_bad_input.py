"""Every kind of bad input gets a clear 4xx JSON answer, and leaves no row and no temp file
behind: unknown ids (404), invalid job configs and dataset registrations (422 naming the
field), uploads too large (413), wrong media types (415), corrupt videos, malformed
skeletons and arrays that do not fit the model (422 naming the problem)."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from robustact.models.data import ntu
from robustact.service.app import create_app
from robustact.service.db import Dataset, Job, Model, Report, make_engine, make_sessionmaker
from robustact.service.settings import Settings
from robustact.service.store import open_store
from tests.service.conftest import TEST_SETTINGS, authorize
from robustact.worker.tasks import add_model

SAMPLE = "S001C001P003R001A002"


@pytest.fixture(scope="module")
def upload_tmp(tmp_path_factory):
    """Uploads spool to this directory (not the shared /tmp) so leaks are visible."""
    directory = tmp_path_factory.mktemp("upload-tmp")
    saved = tempfile.tempdir
    tempfile.tempdir = str(directory)
    yield directory
    tempfile.tempdir = saved


@pytest.fixture(scope="module")
def api(tmp_path_factory, synthetic_root, upload_tmp):
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("api"), "max_upload_mb": 3.0})
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        client.settings = settings
        client.root = synthetic_root
        r = client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic",
                                              "location": str(synthetic_root)})
        assert r.status_code == 201, r.text
        client.dataset = r.json()
        client.model_id = _tiny_model(settings, client.dataset)
        yield client


def _tiny_model(settings: Settings, dataset: dict, owner_id: str | None = None, name: str = "random-tiny",
                **model) -> str:
    """A randomly initialised tiny model registered the way the worker does it, owned by
    ``owner_id``: fusion with one AMR on NTU-style skeletons, unless ``model`` overrides
    config fields (a 2-D skeleton, ``skel_channels=2``, is normalised to a 1920×1080 image)."""
    from robustact.models.checkpoint import save_checkpoint
    from robustact.models.config import TrainConfig, preset_config
    from robustact.models.fusion import build_model

    cfg = preset_config("tiny", num_classes=dataset["num_classes"], **{"num_amr": 1, **model})
    lo, hi = ([-1.5, -1.5, 1.5], [1.5, 1.5, 4.5]) if cfg.skel_channels == 3 else ([0.0, 0.0], [1920.0, 1080.0])
    directory = settings.data_dir / f"ckpt-{name}"
    save_checkpoint(directory, build_model(cfg), {
        "model": cfg.to_dict(), "preset": "tiny", "class_names": dataset["class_names"],
        "normalisation": {"skel_min": lo, "skel_max": hi}, "train": TrainConfig().to_dict()})
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        model = add_model(session, open_store(settings.store_url, settings.s3_endpoint_url), directory, name,
                          dataset_id=dataset["id"], owner_id=owner_id)
        session.commit()
        model_id = model.id
    return model_id


def _counts(api) -> dict[str, int]:
    with make_sessionmaker(make_engine(api.settings.database_url))() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t))
                for t in (Dataset, Job, Model, Report)}


@pytest.fixture
def unchanged(api, upload_tmp):
    """Asserts after the test that no row was added and no upload temp file is left."""
    before = _counts(api)
    yield
    assert _counts(api) == before
    assert list(upload_tmp.iterdir()) == []


def _loc(response: httpx.Response) -> list[str]:
    detail = response.json()["detail"]
    assert isinstance(detail, list), detail
    return [str(part) for part in detail[0]["loc"]]


# --------------------------------------------------------------------------- 404


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/log"), ("POST", "/v1/jobs/nope/cancel"),
    ("POST", "/v1/jobs/nope/retry"), ("GET", "/v1/models/nope"), ("GET", "/v1/models/nope/files/config.json"),
    ("GET", "/v1/reports/nope"), ("GET", "/v1/reports/nope/meta"), ("GET", "/v1/reports/compare?ids=nope"),
    ("GET", "/v1/reports/nope/html"), ("GET", "/v1/reports/view?ids=nope"), ("GET", "/v1/reports/nope/clips"),
    ("GET", "/v1/datasets/nope"), ("DELETE", "/v1/datasets/nope"), ("POST", "/v1/models/nope/classify"),
])
def test_unknown_ids_are_404(api, unchanged, method, path):
    r = api.request(method, path)
    assert r.status_code == 404, r.text
    assert "'nope' not found" in r.json()["detail"]


def test_unknown_ids_in_job_bodies_are_404(api, unchanged):
    r = api.post("/v1/jobs", json={"kind": "train", "dataset_id": "nope"})
    assert r.status_code == 404 and "dataset 'nope'" in r.json()["detail"]
    r = api.post("/v1/jobs", json={"kind": "evaluate", "model_id": "nope"})
    assert r.status_code == 404 and "model 'nope'" in r.json()["detail"]
    r = api.post("/v1/jobs", json={"kind": "evaluate", "model_id": api.model_id, "dataset_id": "nope"})
    assert r.status_code == 404 and "dataset 'nope'" in r.json()["detail"]
    r = api.get(f"/v1/models/{api.model_id}/files/secret.txt")
    assert r.status_code == 404 and "no file" in r.json()["detail"]


# --------------------------------------------------------------------------- 422 jobs


@pytest.mark.parametrize("change,loc,words", [
    ({"defence": "magic"}, "defence", "none"),
    ({"attack": {"eps": 300}}, "eps", "255"),
    ({"attack": {"eps": -1}}, "eps", "0"),
    ({"attack": {"name": "deepfool"}}, "name", "pgd"),
    ({"num_amr": 4}, "num_amr", "3"),
    ({"num_amr": -1}, "num_amr", "0"),
    ({"arch": "rgb", "num_amr": 1}, "num_amr", "fusion"),
    ({"preset": "huge"}, "preset", "tiny"),
    ({"epochs": 0}, "epochs", "1"),
    ({"lam": -1}, "lam", "0"),
    ({"protocol": "xmodal"}, "protocol", "xsub"),
    ({"max_samples": 0}, "max_samples", "1"),
])
def test_invalid_training_jobs_name_the_field(api, unchanged, change, loc, words):
    body = {"kind": "train", "dataset_id": api.dataset["id"], **change}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert _loc(r)[-1] == loc and _loc(r)[0] == "body"
    assert words in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("change,loc", [
    ({"eps": [-1]}, "eps"), ({"eps": [8, 256]}, "eps"), ({"eps": []}, "eps"),
    ({"attacks": ["pgdx"]}, "attacks"), ({"attacks": ["fgsm7"]}, "attacks"),
    ({"modes": ["X"]}, "modes"), ({"split": "val"}, "split"), ({"alpha": 0}, "alpha"),
])
def test_invalid_evaluation_jobs_name_the_field(api, unchanged, change, loc):
    r = api.post("/v1/jobs", json={"kind": "evaluate", "model_id": api.model_id, **change})
    assert r.status_code == 422, r.text
    assert loc in _loc(r)


def test_unknown_job_kind_and_bad_json(api, unchanged):
    r = api.post("/v1/jobs", json={"kind": "explode"})
    assert r.status_code == 422 and "kind" in r.text
    r = api.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_evaluating_on_a_dataset_with_other_classes(api, tmp_path, synthetic_root):
    from robustact.models.data.synth import synthesize

    other = tmp_path / "four"
    synthesize(other, num_classes=4, subjects=(1, 3), cameras=(1,), replications=(1,), frames=8,
               video_size=(16, 16))
    r = api.post("/v1/datasets", json={"name": "four", "format": "synthetic", "location": str(other)})
    assert r.status_code == 201, r.text
    four = r.json()["id"]
    before = _counts(api)
    r = api.post("/v1/jobs", json={"kind": "evaluate", "model_id": api.model_id, "dataset_id": four})
    assert r.status_code == 422 and _loc(r)[-1] == "dataset_id"
    assert "4 classes" in r.json()["detail"][0]["msg"]
    assert _counts(api) == before
    assert api.delete(f"/v1/datasets/{four}").status_code == 204  # unused: can go


# --------------------------------------------------------------------------- 422 datasets


def test_dataset_registration_errors(api, unchanged, tmp_path, synthetic_root):
    def register(**body):
        return api.post("/v1/datasets", json={"name": "x", "format": "synthetic",
                                              "location": str(synthetic_root), **body})

    r = register(format="ntu60")  # a 3-class synthetic set is not NTU RGB+D 60
    assert r.status_code == 422 and _loc(r)[-1] == "format" and "synthetic" in r.text
    r = register(format="kinetics")
    assert r.status_code == 422 and _loc(r)[-1] == "format"
    r = register(location=str(tmp_path / "missing"))
    assert r.status_code == 422 and _loc(r)[-1] == "location" and "no such directory" in r.text
    (tmp_path / "empty").mkdir()
    r = register(location=str(tmp_path / "empty"))
    assert r.status_code == 422 and _loc(r)[-1] == "location" and "no samples" in r.text
    r = register(name="bad name!")
    assert r.status_code == 422 and _loc(r)[-1] == "name"
    no_classes = tmp_path / "ntu-like"
    shutil.copytree(synthetic_root, no_classes)
    (no_classes / "classes.txt").unlink()
    r = register(location=str(no_classes))  # looks like the NTU release: no classes.txt
    assert r.status_code == 422 and _loc(r)[-1] == "format" and "ntu60" in r.text
    bad_name = tmp_path / "bad-name"
    shutil.copytree(synthetic_root, bad_name)
    (bad_name / ntu.SKELETON_DIR / "clip01.skeleton").write_text("1\n0\n")
    r = register(location=str(bad_name))
    assert r.status_code == 422 and "not an NTU sample name" in r.text
    r = register(name="tiny3")
    assert r.status_code == 409 and "already exists" in r.json()["detail"]


def test_dataset_in_use_cannot_be_deleted(api, unchanged):
    r = api.delete(f"/v1/datasets/{api.dataset['id']}")
    assert r.status_code == 409 and "models" in r.json()["detail"]


# --------------------------------------------------------------------------- classify


def _clip(api) -> tuple[bytes, bytes]:
    root = api.root
    return ((root / ntu.RGB_DIR / f"{SAMPLE}{ntu.VIDEO_SUFFIX}").read_bytes(),
            (root / ntu.SKELETON_DIR / f"{SAMPLE}{ntu.SKELETON_SUFFIX}").read_bytes())


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def classify(api, video=None, skeleton=None, **data):
    files = {}
    if video is not None:
        files["video"] = video
    if skeleton is not None:
        files["skeleton"] = skeleton
    return api.post(f"/v1/models/{api.model_id}/classify", files=files, data=data)


def test_classify_good_clip(api, unchanged):
    video, skeleton = _clip(api)
    r = classify(api, ("a.avi", video, "video/x-msvideo"), ("a.skeleton", skeleton, "text/plain"), top_k=3)
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    assert len(top) == 3 and abs(sum(t["probability"] for t in top) - 1) < 1e-4
    mp4 = _reencode(video, "mp4")
    r = classify(api, ("a.mp4", mp4, "video/mp4"), ("a.npy", _npy(np.zeros((5, 25, 3), np.float32) + 2),
                                                   "application/octet-stream"))
    assert r.status_code == 200, r.text
    assert r.json()["inputs"]["skeleton"] == {"frames": 5, "resampled_to": 16, "joints": 25, "bodies": 1}


def _reencode(avi: bytes, container: str) -> bytes:
    import av

    frames = ntu.read_video(io.BytesIO(avi), 8, 32).transpose(1, 2, 3, 0)  # T, H, W, 3
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def test_upload_too_large_is_413(api, unchanged):
    video, skeleton = _clip(api)
    big = video + b"\0" * (3 * 1024 * 1024 + 10)
    r = classify(api, ("a.avi", big, "video/x-msvideo"), ("a.skeleton", skeleton, "text/plain"))
    assert r.status_code == 413 and "MiB" in r.json()["detail"]
    # Without a Content-Length (chunked), the limit is checked after parsing.
    request = api.build_request("POST", f"/v1/models/{api.model_id}/classify",
                                files={"video": ("a.avi", big, "video/x-msvideo"),
                                       "skeleton": ("a.skeleton", skeleton, "text/plain")})
    body = request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    r = api.post(f"/v1/models/{api.model_id}/classify", content=iter([body[:4096], body[4096:]]), headers=headers)
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("field,upload", [
    ("video", ("a.gif", b"GIF89a", "image/gif")),
    ("video", ("a.avi", b"x", "text/plain")),
    ("video", ("a", b"x", "application/octet-stream")),
    ("skeleton", ("a.txt", b"1\n0\n", "text/plain")),
    ("skeleton", ("a.skeleton", b"1\n0\n", "image/png")),
])
def test_wrong_media_type_is_415(api, unchanged, field, upload):
    video, skeleton = _clip(api)
    files = {"video": ("a.avi", video, "video/x-msvideo"), "skeleton": ("a.skeleton", skeleton, "text/plain"),
             field: upload}
    r = classify(api, files["video"], files["skeleton"])
    assert r.status_code == 415, r.text
    assert r.json()["detail"].startswith(field)


def _truncated(skeleton: bytes) -> bytes:
    lines = skeleton.decode().splitlines()
    return "\n".join(lines[: len(lines) // 2]).encode()


@pytest.mark.parametrize("field,upload,words", [
    ("video", ("a.avi", b"RIFF\0\0\0\0AVI garbage" * 50, "video/x-msvideo"), "corrupt or unreadable video"),
    ("video", ("a.avi", b"", "video/x-msvideo"), "video"),
    ("skeleton", ("a.skeleton", "truncated", "text/plain"), "unexpected end of file"),
    ("skeleton", ("a.skeleton", b"2\n1\n72057594037931101 0 1 1 1 1 0 0.1 0.2 2\n25\n1 2 3\n", "text/plain"),
     "line 5"),
    ("skeleton", ("a.skeleton", b"\x89PNG\r\n\x1a\n", "text/plain"), "not a text file"),
    ("skeleton", ("a.skeleton", b"3\n0\n0\n0\n", "text/plain"), "no body"),
    ("skeleton", ("a.skeleton", b"", "text/plain"), "empty"),
    ("skeleton", ("a.npy", np.zeros((10, 20, 3), np.float32), "application/octet-stream"), "20 joints"),
    ("skeleton", ("a.npy", np.zeros((10, 25, 2), np.float32), "application/octet-stream"), "2 coordinates"),
    ("skeleton", ("a.npy", np.zeros((10, 25, 3, 3), np.float32), "application/octet-stream"), "3 bodies"),
    ("skeleton", ("a.npy", np.zeros((0, 25, 3), np.float32), "application/octet-stream"), "no frames"),
    ("skeleton", ("a.npy", np.zeros((10, 25), np.float32), "application/octet-stream"), "shape"),
    ("skeleton", ("a.npy", np.full((4, 25, 3), np.nan, np.float32), "application/octet-stream"), "NaN"),
    ("skeleton", ("a.npy", np.array([{"a": 1}], dtype=object), "application/octet-stream"), "not a readable"),
    ("skeleton", ("a.npy", b"\x93NUMPY garbage", "application/octet-stream"), "not a readable"),
])
def test_corrupt_or_mismatched_uploads_are_422(api, unchanged, field, upload, words):
    video, skeleton = _clip(api)
    name, content, media = upload
    if isinstance(content, np.ndarray):
        content = _npy(content)
    elif content == "truncated":
        content = _truncated(skeleton)
    files = {"video": ("a.avi", video, "video/x-msvideo"), "skeleton": ("a.skeleton", skeleton, "text/plain"),
             field: (name, content, media)}
    r = classify(api, files["video"], files["skeleton"])
    assert r.status_code == 422, r.text
    assert _loc(r) == ["body", field]
    assert words in r.json()["detail"][0]["msg"]


def test_missing_modality_is_422(api, unchanged):
    video, skeleton = _clip(api)
    r = classify(api, video=("a.avi", video, "video/x-msvideo"))
    assert r.status_code == 422 and _loc(r) == ["body", "skeleton"]
    r = classify(api, skeleton=("a.skeleton", skeleton, "text/plain"))
    assert r.status_code == 422 and _loc(r) == ["body", "video"]
    r = classify(api, ("a.avi", video, "video/x-msvideo"), ("a.skeleton", skeleton, "text/plain"), top_k=0)
    assert r.status_code == 422 and _loc(r) == ["body", "top_k"]


def test_large_uploads_spool_to_disk_and_are_removed(api, unchanged, upload_tmp):
    """Uploads over 1 MiB spool to a temp file; it is gone after the request (the
    ``unchanged`` fixture checks), whatever the outcome."""
    video, skeleton = _clip(api)
    padded = skeleton + b"\n" * (1200 * 1024)  # trailing blank lines are allowed
    r = classify(api, ("a.avi", b"\0" * 400 * 1024, "video/x-msvideo"), ("a.skeleton", padded, "text/plain"))
    assert r.status_code == 422 and _loc(r) == ["body", "video"]
    r = classify(api, ("a.avi", video, "video/x-msvideo"), ("a.skeleton", padded, "text/plain"))
    assert r.status_code == 200, r.text


def test_errors_are_json_everywhere(api):
    r = api.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = api.get("/v1/jobs", params={"status": "sleeping"})
    assert r.status_code == 422 and _loc(r) == ["query", "status"]
    r = api.get("/v1/jobs", params={"limit": 0})
    assert r.status_code == 422 and _loc(r) == ["query", "limit"]
    r = api.get("/v1/reports/compare")
    assert r.status_code == 422 and _loc(r) == ["query", "ids"]
    assert Path(api.settings.data_dir).is_dir()


# --------------------------------------------------------------------------- compare


def test_compare_inline_reports_reproduces_the_papers_ri(api, unchanged):
    """POST /v1/reports/compare takes report documents too (as the CLI writes them)."""
    from robustact.models.report import compare
    from tests.fixtures.make_paper_reports import PAPER_RI, TABLE2, paper_report

    reports = [paper_report(*row, dataset="ntu") for row in TABLE2["ntu"]]
    r = api.post("/v1/reports/compare", json={"reports": reports, "baseline": "None", "attack": "PGD20"})
    assert r.status_code == 200, r.text
    table = r.json()
    assert table["baseline"] == "None" and [row["name"] for row in table["rows"]] == [row[0] for row in TABLE2["ntu"]]
    assert table["rows"][-1]["name"] == "AMR" and round(table["rows"][-1]["ri"], 2) == PAPER_RI["ntu"][-1]
    assert table == {**compare(reports, baseline="None", attack="PGD20"), "report_ids": []}

    r = api.post("/v1/reports/compare", json={"reports": reports, "baseline": "Nobody"})
    assert r.status_code == 422 and _loc(r) == ["body", "baseline"]
    r = api.post("/v1/reports/compare", json={"reports": reports, "attack": "CW30"})
    assert r.status_code == 422 and _loc(r) == ["body", "attack"] and "no CW30 results" in r.text
    r = api.post("/v1/reports/compare", json={"reports": [{"schema": "other"}]})
    assert r.status_code == 422 and _loc(r) == ["body", "reports"] and "schema" in r.text
    r = api.post("/v1/reports/compare", json={})
    assert r.status_code == 422 and _loc(r) == ["body", "report_ids"]
    r = api.post("/v1/reports/compare", json={"report_ids": ["nope"]})
    assert r.status_code == 404


def test_compare_over_the_api_never_picks_a_budget_and_warns_of_unlike_settings(api, unchanged):
    """Issue 11, item 2, through the API: several budgets and no eps is a 422 on eps listing
    them; the budget used is in the answer; unlike settings come back as warnings."""
    import copy

    from tests.fixtures.make_view_reports import fusion_report

    a, b = fusion_report("A"), fusion_report("B", strength=0.5)
    r = api.post("/v1/reports/compare", json={"reports": [a, b], "attack": "PGD20"})
    assert r.status_code == 422 and _loc(r) == ["body", "eps"] and "several budgets (2, 4, 6, 8 /255)" in r.text
    r = api.post("/v1/reports/compare", json={"reports": [a, b], "attack": "PGD20", "eps": 8})
    assert r.status_code == 200 and r.json()["eps_used"] == 8 and r.json()["warnings"] == []
    slow = copy.deepcopy(b)
    for entry in slow["attacks"]:
        entry["alpha_rgb"] = entry["alpha_skel"] = 1 / 255
    r = api.post("/v1/reports/compare", json={"reports": [a, slow], "attack": "PGD20", "eps": 8})
    assert r.status_code == 200 and any(w.startswith("α differs") for w in r.json()["warnings"]), r.json()


def _store_report(api, document: dict) -> str:
    """A report row and its document, stored the way the worker stores them."""
    from robustact.service.db import new_id

    report_id = new_id()
    key = f"reports/{report_id}/report.json"
    open_store(api.settings.store_url).put_bytes(key, json.dumps(document).encode())
    with make_sessionmaker(make_engine(api.settings.database_url))() as session:
        session.add(Report(id=report_id, name=document["model"]["name"], artifact_key=key))
        session.commit()
    return report_id


def test_report_views_as_html_and_json(api):
    """GET /v1/reports/{id}/html and /v1/reports/view: the page and the views of stored reports."""
    from tests.fixtures.make_view_reports import view_reports

    none, at_rs, amr = (_store_report(api, r) for r in view_reports()[:3])
    r = api.get(f"/v1/reports/{amr}/html")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.text.startswith("<!DOCTYPE html>") and "<script" not in r.text
    assert r.text.count("<svg") == 3 + 3 and "AMR &lt;3&gt;" in r.text  # 3 curve panels, 3 AMRs

    r = api.get("/v1/reports/view", params={"ids": f"{none},{at_rs},{amr}", "baseline": at_rs, "attack": "CW30",
                                            "eps": 8})
    assert r.status_code == 200, r.text
    views = r.json()
    assert views["schema"] == "robustact.views/v1" and views["report_ids"] == [none, at_rs, amr]
    table = views["defence_table"]
    assert table["attack"] == "CW30" and table["baseline"] == f"AT-RS ({at_rs[:8]})" and table["rows"][1]["ri"] == 0
    assert {row["eps_used"] for row in table["rows"]} == {8.0}
    assert len(views["robustness_curves"]["panels"]) == 9 and len(views["amr_weights"]) == 1

    r = api.get("/v1/reports/view", params={"ids": [none, amr], "format": "html", "title": "<T>"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>&lt;T&gt;</title>" in r.text

    r = api.get("/v1/reports/view", params={"ids": none, "baseline": "nope"})
    assert r.status_code == 422 and _loc(r) == ["query", "baseline"]
    r = api.get("/v1/reports/view", params={"ids": none, "attack": "PGD7"})
    assert r.status_code == 422 and _loc(r) == ["query", "attack"] and "no report has PGD7" in r.text
    r = api.get("/v1/reports/view", params={"ids": none, "format": "png"})
    assert r.status_code == 422 and _loc(r) == ["query", "format"]
    r = api.get("/v1/reports/view", params={"ids": ","})
    assert r.status_code == 422 and _loc(r) == ["query", "ids"]
    r = api.get("/v1/reports/view")
    assert r.status_code == 422 and _loc(r) == ["query", "ids"]


# --------------------------------------------------------------------------- backends down


def test_broker_down_keeps_the_job_queued_for_the_outbox(tmp_path, synthetic_root):
    """With the broker down a submission still succeeds: the job waits, unsent, for the
    outbox (``tests/service/test_outages.py`` checks that it is sent once the broker is back)."""
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path, "broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"].startswith("error") and ready.json()["checks"]["database"] == "ok"
        r = client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic", "location": str(synthetic_root)})
        assert r.status_code == 201
        r = client.post("/v1/jobs", json={"kind": "train", "dataset_id": "tiny3"})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued" and r.json()["timings"]["sent_at"] is None
        jobs = client.get("/v1/jobs").json()["items"]
        assert len(jobs) == 1 and jobs[0]["status"] == "queued" and jobs[0]["timings"]["sent_at"] is None


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/sweeps"])
@pytest.mark.parametrize("offset", ["1" * 40, str(2**63), "-1"])
def test_list_offsets_out_of_range_are_422(api, path, offset):
    r = api.get(path, params={"offset": offset})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", "offset"]
    assert api.get(path, params={"offset": 2**31 - 1}).status_code == 200
