"""Registering an iMiGUE-style dataset over the API (format ``imigue``), from a path or an
s3:// prefix: its layout, skeleton geometry, X-Sub counts and layout errors (422 naming the
file and line), and jobs on it: protocols it lacks and models of another skeleton geometry
are 422s, a training job builds a 2-D, 22-joint, 1-body model. No worker runs here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from robustact.service.app import create_app
from robustact.service.db import Dataset, make_engine, make_sessionmaker
from robustact.service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, api_with_dataset, authorize
from tests.service.test_bad_input import _tiny_model

GEOMETRY_2D = {"joints": 22, "skel_channels": 2, "persons": 1}
GEOMETRY_NTU = {"joints": 25, "skel_channels": 3, "persons": 2}


@pytest.fixture(scope="module")
def imigue_root(tmp_path_factory) -> Path:
    """4 classes, subject 1 (X-Sub train) and 3 (test), one video each holding one clip per class."""
    from robustact.models.data.synth_imigue import synthesize_imigue

    root = tmp_path_factory.mktemp("imigue") / "mini"
    synthesize_imigue(root, num_classes=4, subjects=(1, 3), sessions=1, frames=12, objects=2)
    return root


@pytest.fixture(scope="module")
def api(tmp_path_factory, imigue_root):
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("api-imigue")})
    with api_with_dataset(settings, "mini-imigue", "imigue", str(imigue_root)) as client:
        yield client


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _error(r) -> tuple[str, str]:
    """(the field a 422 names, its message)."""
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    return str(detail["loc"][-1]), detail["msg"]


def _register(api, location, **body):
    return api.post("/v1/datasets", json={"name": "other", "format": "imigue", "location": str(location), **body})


def test_registration_reads_the_layout(api, imigue_root):
    dataset = api.dataset
    assert dataset["format"] == "imigue" and dataset["layout"] == "imigue"
    assert dataset["geometry"] == GEOMETRY_2D
    assert dataset["class_names"] == (imigue_root / "classes.txt").read_text().split("\n")[:4]
    rows = (imigue_root / "labels.csv").read_text().splitlines()[1:]
    subjects = [int(row.split(",")[-1]) for row in rows]
    train = json.loads((imigue_root / "split.json").read_text())["train_subjects"]
    assert dataset["num_samples"] == len(rows) == 8 and dataset["incomplete_samples"] == 0
    assert dataset["splits"] == {"xsub": {"train": sum(s in train for s in subjects),
                                          "test": sum(s not in train for s in subjects)}}
    assert api.get(f"/v1/datasets/{dataset['id']}").json()["geometry"] == GEOMETRY_2D


def test_only_the_xsub_protocol(api, imigue_root):
    field, msg = _error(_register(api, imigue_root, protocol="xview"))
    assert field == "protocol" and "an iMiGUE-style dataset has only the xsub protocol" in msg


def test_a_format_that_does_not_match_the_files(api, imigue_root, synthetic_root):
    field, msg = _error(_register(api, synthetic_root))  # an NTU-layout root
    assert field == "format" and "no labels.csv" in msg and "not an iMiGUE-style dataset" in msg
    for fmt in ("synthetic", "ntu60"):
        field, msg = _error(_register(api, imigue_root, format=fmt))
        assert field == "format" and "labels.csv" in msg and "use format imigue" in msg


def test_layout_errors_name_the_file_and_line(api, imigue_root, tmp_path):
    root = _copy(imigue_root, tmp_path)
    labels = root / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[3] = "0001_01,7,36,47,1"  # line 4: class 7 of 4
    labels.write_text("\n".join(lines) + "\n")
    field, msg = _error(_register(api, root))
    assert field == "location" and f"{labels}: line 4: class 7 is not in 1..4" in msg
    (root / "split.json").unlink()
    field, msg = _error(_register(api, root))
    assert field == "location" and "split.json: missing" in msg


def test_a_clip_without_its_skeleton_directory_is_incomplete(api, imigue_root, tmp_path):
    root = _copy(imigue_root, tmp_path)
    shutil.rmtree(root / "skeleton" / "0003_01")  # the test subject's video: its 4 clips
    r = _register(api, root, name="no-test-skeletons")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["num_samples"] == 4 and body["incomplete_samples"] == 4
    assert body["splits"] == {"xsub": {"train": 4, "test": 0}}
    assert api.delete(f"/v1/datasets/{body['id']}").status_code == 204


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_protocol_the_dataset_lacks_is_422(api, kind):
    model_id = _tiny_model(api.settings, api.dataset, name=f"pose-2d-{kind}", **GEOMETRY_2D)
    body = {"kind": "train", "dataset_id": api.dataset["id"]} if kind == "train" else \
        {"kind": "evaluate", "model_id": model_id, "dataset_id": api.dataset["id"]}
    field, msg = _error(api.post("/v1/jobs", json={**body, "protocol": "xview"}))
    assert field == "protocol" and "only the xsub protocol" in msg and "mini-imigue" in msg


def test_an_ntu_model_is_refused_on_2d_pose(api):
    model_id = _tiny_model(api.settings, api.dataset, name="ntu-3d")  # 25 joints × 3 × 2 bodies
    r = api.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "dataset_id": api.dataset["id"]})
    field, msg = _error(r)
    assert field == "dataset_id"
    assert "takes skeletons of 25 joints × 3 coordinates × 2 bodies" in msg
    assert "holds 22 joints × 2 coordinates × 1 body" in msg


def test_a_training_job_builds_a_2d_model(api):
    r = api.post("/v1/jobs", json={"kind": "train", "dataset_id": api.dataset["id"], "defence": "none"})
    assert r.status_code == 202, r.text
    job = r.json()
    config = job["params"]["model_config"]
    assert {k: config[k] for k in GEOMETRY_2D} == GEOMETRY_2D and config["num_classes"] == 4
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # no worker runs it


def test_a_dataset_from_before_layouts_is_ntu(api, synthetic_root):
    r = api.post("/v1/datasets", json={"name": "old-ntu", "format": "synthetic", "location": str(synthetic_root)})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["layout"] == "ntu" and dataset["geometry"] == GEOMETRY_NTU
    with make_sessionmaker(make_engine(api.settings.database_url))() as session:
        row = session.get(Dataset, dataset["id"])
        info = {k: v for k, v in row.info.items() if k not in ("layout", "geometry")}
        session.execute(update(Dataset).where(Dataset.id == row.id).values(info=info))
        session.commit()
    again = api.get(f"/v1/datasets/{dataset['id']}").json()
    assert again["layout"] == "ntu" and again["geometry"] == GEOMETRY_NTU
    model_id = _tiny_model(api.settings, dataset, name="ntu-on-old")
    r = api.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "dataset_id": dataset["id"],
                                   "protocol": "xview", "attacks": ["fgsm"], "modes": ["RS"]})
    assert r.status_code == 202, r.text  # same geometry, and xview is one of its protocols
    assert api.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code == 202


def test_registered_from_s3(tmp_path, imigue_root, s3_endpoint, s3_bucket):
    from robustact.service.store import open_store

    bucket = s3_bucket("imigue")
    location = f"s3://{bucket}/datasets/mini"
    store = open_store(location, endpoint_url=s3_endpoint)
    store.put_dir("", imigue_root)
    store.delete_prefix("skeleton/0003_01")
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "api", "s3_endpoint_url": s3_endpoint,
                           "dataset_roots": f"s3://{bucket}/datasets"})
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        r = _register(client, location, name="s3-imigue")
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["layout"] == "imigue" and body["geometry"] == GEOMETRY_2D
        assert body["num_samples"] == 4 and body["incomplete_samples"] == 4
        assert body["splits"] == {"xsub": {"train": 4, "test": 0}}
        field, msg = _error(_register(client, location, format="ntu60"))
        assert field == "format" and "use format imigue" in msg
        store.put_bytes("labels.csv", b"video_id,class,start_frame,end_frame,subject_id\n0001_01,7,0,11,1\n")
        field, msg = _error(_register(client, location))
        assert field == "location" and f"{location}/labels.csv: line 2: class 7 is not in 1..4" in msg
        store.delete("split.json")
        field, msg = _error(_register(client, location))
        assert field == "location" and f"{location}/split.json: missing" in msg


def test_a_layout_file_linked_from_outside_the_roots_is_refused(tmp_path, imigue_root):
    allowed = tmp_path / "allowed"
    root = Path(shutil.copytree(imigue_root, allowed / "mini"))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(root / "labels.csv", outside / "labels.csv")
    (root / "labels.csv").symlink_to(outside / "labels.csv")
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "api", "dataset_roots": str(allowed)})
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        field, msg = _error(_register(client, root))
        assert field == "location" and "outside the dataset roots" in msg
