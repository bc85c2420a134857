"""Sweeps (/v1/sweeps): a grid or a preset expands to exactly the right jobs, one invalid
combination or a grid too large creates nothing, unknown ids are 404, a sweep is
cancelled as one, its combined report merges the evaluations of a model; and end to end
with a real worker, an ε sweep over a freshly trained model."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select, update

from robustact.service.db import Job, JobGroup, Model, Report, make_engine, make_sessionmaker
from robustact.service.settings import Settings
from robustact.service.store import open_store
from tests.fixtures.make_view_reports import fusion_report
from tests.service.conftest import TEST_SETTINGS, api_with_dataset
from tests.service.test_bad_input import _tiny_model


@pytest.fixture(scope="module")
def api(tmp_path_factory, synthetic_root):
    """The API with the embedded broker and no worker: submitted jobs stay queued."""
    # Nothing runs here, so sweeps pile up: quotas are tested in test_security.py.
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("sweeps"), "max_active_sweeps": 1000,
                           "max_active_jobs": 1000})
    with api_with_dataset(settings, "tiny3", "synthetic", str(synthetic_root)) as client:
        client.model_id = _tiny_model(settings, client.dataset)
        client.sessions = make_sessionmaker(make_engine(settings.database_url))
        yield client


def _counts(api) -> tuple[int, int]:
    with api.sessions() as session:
        return (session.scalar(select(func.count()).select_from(JobGroup)),
                session.scalar(select(func.count()).select_from(Job)))


@pytest.fixture
def unchanged(api):
    before = _counts(api)
    yield
    assert _counts(api) == before


def _sweep(api, **body) -> dict:
    r = api.post("/v1/sweeps", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/sweeps/{r.json()['id']}"
    return r.json()


def _jobs(api, sweep: dict) -> list[dict]:
    items = api.get("/v1/jobs", params={"group_id": sweep["id"], "limit": 500}).json()["items"]
    return sorted(items, key=lambda j: j["params"]["sweep"]["index"])


def _loc(r) -> list[str]:
    return [str(p) for p in r.json()["detail"][0]["loc"]]


def test_table4_preset_is_one_request(api):
    before = _counts(api)
    sweep = _sweep(api, kind="train", preset="table4", base={"dataset_id": "tiny3", "epochs": 2})
    assert _counts(api) == (before[0] + 1, before[1] + 5)
    assert sweep["status"] == "queued" and sweep["total"] == 5 and sweep["counts"]["queued"] == 5
    assert sweep["name"] == "table4" and sweep["preset"] == "table4"
    assert sweep["grid"] == {"defence": ["at-rs", "amr", "amr-frozen"], "num_amr": [0, 1, 2, 3]}
    assert [j["varied"] for j in sweep["jobs"]] == [
        {"defence": "at-rs", "num_amr": 0}, {"defence": "amr", "num_amr": 1}, {"defence": "amr", "num_amr": 2},
        {"defence": "amr", "num_amr": 3}, {"defence": "amr-frozen", "num_amr": 3}]
    jobs = _jobs(api, sweep)
    assert [(j["params"]["train_config"]["defence"], j["params"]["model_config"]["num_amr"]) for j in jobs] == [
        ("at-rs", 0), ("amr", 1), ("amr", 2), ("amr", 3), ("amr-frozen", 3)]
    assert all(j["group_id"] == sweep["id"] and j["links"]["sweep"] == f"/v1/sweeps/{sweep['id']}" for j in jobs)
    assert {j["params"]["train_config"]["epochs"] for j in jobs} == {2}
    assert api.get(f"/v1/sweeps/{sweep['id']}").json() == sweep


def test_table5_preset_crossed_with_seeds(api):
    sweep = _sweep(api, kind="train", preset="table5", base={"dataset_id": "tiny3", "name": "t5"})
    jobs = _jobs(api, sweep)
    assert [j["params"]["train_config"]["lam"] for j in jobs] == [0.1, 0.5, 1.0, 2.0, 5.0]
    assert {(j["params"]["train_config"]["defence"], j["params"]["model_config"]["num_amr"]) for j in jobs} == {
        ("amr", 1)}
    assert len({j["params"]["name"] for j in jobs}) == 5 and jobs[0]["params"]["name"].startswith("t5[")

    seeded = _sweep(api, kind="train", preset="table5", base={"dataset_id": "tiny3"}, grid={"seed": [0, 1]})
    assert seeded["total"] == 10
    assert [(j["varied"]["lam"], j["varied"]["seed"]) for j in seeded["jobs"][:3]] == [(0.1, 0), (0.1, 1), (0.5, 0)]


def test_grid_is_the_cartesian_product(api):
    sweep = _sweep(api, kind="train", base={"dataset_id": "tiny3", "defence": "amr"},
                   grid={"defence": ["none", "at-rs"], "lam": [0.5], "seed": [0, 1, 2]})
    assert sweep["total"] == 6 and sweep["name"] == "train over defence × lam × seed"
    combos = {(j["params"]["train_config"]["defence"], j["params"]["train_config"]["seed"]) for j in _jobs(api, sweep)}
    assert combos == {(d, s) for d in ("none", "at-rs") for s in (0, 1, 2)}

    evaluation = _sweep(api, kind="evaluate", base={"model_id": api.model_id, "attacks": ["fgsm"]},
                        grid={"eps": [[2], [4], [6], [8]]})
    jobs = _jobs(api, evaluation)
    assert [{round(c["eps_rgb"] * 255, 3) for c in j["params"]["suite"]} for j in jobs] == [{2}, {4}, {6}, {8}]
    assert {j["model_id"] for j in evaluation["jobs"]} == {api.model_id}

    # The AutoAttack-grade attacks, restarts and the cascade sweep like any field.
    robust = _sweep(api, kind="evaluate", base={"model_id": api.model_id, "attacks": ["autoattack"], "modes": ["RS"]},
                    grid={"restarts": [1, 3], "strategy": ["full", "worst-case"]})
    jobs = _jobs(api, robust)
    assert [(j["params"]["strategy"], {c["restarts"] for c in j["params"]["suite"]}) for j in jobs] == [
        ("full", {1}), ("worst-case", {1}), ("full", {3}), ("worst-case", {3})]
    assert [c["name"] for c in jobs[0]["params"]["suite"]] == ["apgd-ce", "apgd-dlr", "square"]
    assert jobs[0]["params"]["suite"][2]["steps"] == 5000


@pytest.mark.parametrize("body,loc,words", [
    ({"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"num_amr": [1, 4]}},
     ["body", "grid", "num_amr"], "combination 1 (num_amr=4)"),
    ({"kind": "train", "base": {"dataset_id": "tiny3", "num_amr": 1}, "grid": {"arch": ["fusion", "rgb"]}},
     ["body", "base", "num_amr"], 'combination 1 (arch="rgb")'),
    ({"kind": "train", "preset": "table4", "base": {"dataset_id": "tiny3", "epochs": 0}},
     ["body", "base", "epochs"], "combination 0"),
    ({"kind": "evaluate", "base": {"model_id": "MODEL"}, "grid": {"eps": [[4], [300]]}},
     ["body", "grid", "eps", "0"], "combination 1"),
    ({"kind": "evaluate", "base": {"model_id": "MODEL"}, "grid": {"attacks": [["fgsm"], ["pgdx"]]}},
     ["body", "grid", "attacks", "0"], "combination 1"),
    ({"kind": "evaluate", "base": {"model_id": "MODEL"}, "grid": {"attacks": [["apgd-ce"], ["square0"]]}},
     ["body", "grid", "attacks", "0"], "combination 1"),
    ({"kind": "evaluate", "base": {"model_id": "MODEL"}, "grid": {"restarts": [2, 0]}},
     ["body", "grid", "restarts"], "combination 1"),
    ({"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"magic": [1]}}, ["body", "grid", "magic"],
     "not a field"),
    ({"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"seed": []}}, ["body", "grid", "seed"], "at least"),
    ({"kind": "train", "preset": "table4", "base": {"dataset_id": "tiny3"}, "grid": {"num_amr": [1]}},
     ["body", "grid", "num_amr"], "preset"),
    ({"kind": "evaluate", "preset": "table5", "base": {"model_id": "MODEL"}}, ["body", "preset"], "train"),
    ({"kind": "train", "base": {"dataset_id": "tiny3"}}, ["body", "grid"], "preset"),
    ({"kind": "train", "base": {"kind": "evaluate"}, "grid": {"seed": [1]}}, ["body", "base", "kind"], "train"),
    ({"kind": "train", "preset": "table9", "base": {}}, ["body", "preset"], "table4"),
])
def test_an_invalid_combination_creates_nothing(api, unchanged, body, loc, words):
    body = json.loads(json.dumps(body).replace("MODEL", api.model_id))
    r = api.post("/v1/sweeps", json=body)
    assert r.status_code == 422, r.text
    assert _loc(r) == loc and words in r.json()["detail"][0]["msg"]


def test_too_large_a_grid_is_422(api, unchanged):
    r = api.post("/v1/sweeps", json={"kind": "train", "base": {"dataset_id": "tiny3"},
                                     "grid": {"seed": list(range(13)), "lam": [0.5, 1, 2, 4, 8]}})
    assert r.status_code == 422 and _loc(r) == ["body", "grid"] and "65 jobs" in r.text and "64" in r.text
    r = api.post("/v1/sweeps", json={"kind": "train", "preset": "table4", "base": {"dataset_id": "tiny3"},
                                     "grid": {"seed": list(range(16)), "lam": [1, 2]}})
    assert r.status_code == 422 and "160 jobs" in r.text


def test_unknown_ids_are_404(api, unchanged):
    for method, path in [("GET", "/v1/sweeps/nope"), ("POST", "/v1/sweeps/nope/cancel"),
                         ("GET", "/v1/sweeps/nope/report")]:
        r = api.request(method, path)
        assert r.status_code == 404 and "sweep 'nope' not found" in r.json()["detail"], (path, r.text)
    r = api.post("/v1/sweeps", json={"kind": "train", "base": {"dataset_id": "nope"}, "grid": {"seed": [0]}})
    assert r.status_code == 404 and "dataset 'nope'" in r.json()["detail"]
    r = api.post("/v1/sweeps", json={"kind": "evaluate", "base": {}, "grid": {"model_id": [api.model_id, "nope"]}})
    assert r.status_code == 404 and "combination 1" in r.json()["detail"] and "model 'nope'" in r.json()["detail"]


def test_cancel_a_sweep_and_list(api):
    sweep = _sweep(api, kind="train", base={"dataset_id": "tiny3"}, grid={"seed": [0, 1, 2]})
    with api.sessions() as session:  # one job already picked up by a worker
        session.execute(update(Job).where(Job.id == sweep["jobs"][0]["id"]).values(status="running"))
        session.commit()
    assert api.get(f"/v1/sweeps/{sweep['id']}").json()["status"] == "running"
    r = api.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert r.status_code == 202, r.text
    cancelled = r.json()
    assert cancelled["counts"] == {"queued": 0, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 2}
    assert [j["status"] for j in cancelled["jobs"]] == ["running", "cancelled", "cancelled"]
    assert api.get(f"/v1/jobs/{sweep['jobs'][0]['id']}").json()["cancel_requested"]
    with api.sessions() as session:  # the worker stops it
        session.execute(update(Job).where(Job.id == sweep["jobs"][0]["id"]).values(status="cancelled"))
        session.commit()
    done = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "cancelled" and "cancel" not in done["links"]
    assert api.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 409

    listed = api.get("/v1/sweeps", params={"kind": "train", "limit": 2}).json()
    assert listed["items"][0]["id"] == sweep["id"] and listed["items"][0]["jobs"] is None
    assert listed["total"] >= 3 and len(listed["items"]) == 2
    assert all(s["kind"] == "evaluate" for s in api.get("/v1/sweeps", params={"kind": "evaluate"}).json()["items"])


def _finish(api, job_id: str, document: dict, model_id: str | None) -> str:
    """Mark a job succeeded with ``document`` as its report, the way the worker does."""
    report_id = f"r{job_id[:15]}"
    key = f"reports/{report_id}/report.json"
    open_store(api.settings.store_url).put_bytes(key, json.dumps(document).encode())
    with api.sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.add(Report(id=report_id, name="random-tiny", job_id=job_id, model_id=model_id,
                           dataset_id=api.dataset["id"], artifact_key=key))
        session.commit()
    return report_id


def test_combined_reports(api):
    evaluation = _sweep(api, kind="evaluate", base={"model_id": api.model_id, "attacks": ["pgd20"]},
                        grid={"eps": [[2], [8]]})
    r = api.get(f"/v1/sweeps/{evaluation['id']}/report")
    assert r.status_code == 409 and "no finished evaluation yet (2 queued)" in r.json()["detail"]
    first = _finish(api, evaluation["jobs"][0]["id"], fusion_report(eps_list=(2,)), api.model_id)
    partial = api.get(f"/v1/sweeps/{evaluation['id']}/report").json()
    assert partial["report_ids"] == [first] and partial["unfinished_jobs"] == 1
    second = _finish(api, evaluation["jobs"][1]["id"], fusion_report(eps_list=(8,)), api.model_id)
    assert api.get(f"/v1/sweeps/{evaluation['id']}").json()["status"] == "succeeded"

    views = api.get(f"/v1/sweeps/{evaluation['id']}/report", params={"attack": "PGD20"}).json()
    assert views["schema"] == "robustact.views/v1" and views["sweep_id"] == evaluation["id"]
    assert views["report_ids"] == [first, second] and len(views["reports"]) == 1  # one model: one curve
    panel = next(p for p in views["robustness_curves"]["panels"] if p["attack"] == "PGD20")
    assert [pt["eps"] for pt in panel["series"]["RS"]] == [2.0, 8.0]
    assert views["sources"][0]["report_ids"] == [first, second]
    page = api.get(f"/v1/sweeps/{evaluation['id']}/report", params={"format": "html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.startswith("<!DOCTYPE html>") and "<svg" in page.text and "<script" not in page.text
    assert api.get(f"/v1/sweeps/{evaluation['id']}/report", params={"baseline": second}).status_code == 200
    r = api.get(f"/v1/sweeps/{evaluation['id']}/report", params={"baseline": "nope"})
    assert r.status_code == 422 and _loc(r) == ["query", "baseline"]
    r = api.get(f"/v1/sweeps/{evaluation['id']}/report", params={"attack": "CW7"})
    assert r.status_code == 422 and _loc(r) == ["query", "attack"]

    training = _sweep(api, kind="train", base={"dataset_id": "tiny3"}, grid={"defence": ["none", "amr"]})
    r = api.get(f"/v1/sweeps/{training['id']}/report")
    assert r.status_code == 409 and "none of its jobs has produced a model yet" in r.json()["detail"]
    with api.sessions() as session:  # each job produced a model (copies of the random one)
        template = session.get(Model, api.model_id)
        for i, job in enumerate(training["jobs"]):
            session.add(Model(id=f"m{i}{job['id'][:14]}", name=f"{job['varied']['defence']}-model", job_id=job["id"],
                              dataset_id=api.dataset["id"], config=template.config,
                              artifact_prefix=template.artifact_prefix))
            session.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded"))
        session.commit()
    r = api.get(f"/v1/sweeps/{training['id']}/report")
    assert r.status_code == 409 and "no evaluation report yet" in r.json()["detail"] and "model_id" in r.text
    models = [f"m{i}{job['id'][:14]}" for i, job in enumerate(training["jobs"])]
    evaluated = _sweep(api, kind="evaluate", base={"attacks": ["pgd20"]}, grid={"model_id": models})
    for job, model, (name, defence, strength) in zip(evaluated["jobs"], models,
                                                      [("None", "none", 1.0), ("AMR", "amr", 0.2)]):
        _finish(api, job["id"], fusion_report(name, defence, strength=strength, eps_list=(8,)), model)
    views = api.get(f"/v1/sweeps/{training['id']}/report", params={"attack": "PGD20"}).json()
    assert [s["model_id"] for s in views["sources"]] == models
    rows = views["defence_table"]["rows"]
    assert len(rows) == 2 and rows[0]["ri"] == 0 and rows[1]["ri"] > 0  # against the undefended model


def _wait_sweep(svc, sweep_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        sweep = svc.client.get(f"/v1/sweeps/{sweep_id}").json()
        if sweep["status"] not in ("queued", "running"):
            return sweep
        if time.monotonic() > deadline:
            raise AssertionError(f"sweep still {sweep['status']} after {timeout}s: {sweep}\n{svc.worker_logs()}")
        time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.slow
def test_eps_sweep_end_to_end(live_service, synthetic_root):
    svc = live_service("embedded")
    c = svc.client
    r = c.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic", "location": str(synthetic_root)})
    assert r.status_code == 201, r.text
    r = c.post("/v1/jobs", json={"kind": "train", "dataset_id": "tiny3", "defence": "none", "epochs": 1,
                                 "batch_size": 6, "max_samples": 6})
    assert r.status_code == 202, r.text
    train = svc.wait_job(r.json()["id"])
    assert train["status"] == "succeeded", (train, svc.worker_logs())
    model_id = train["outputs"]["model_id"]

    sweep = _sweep(svc.client, kind="evaluate", name="eps",
                   base={"model_id": model_id, "attacks": ["fgsm"], "max_samples": 3, "batch_size": 3},
                   grid={"eps": [[4], [8]]})
    done = _wait_sweep(svc, sweep["id"])
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 2, (done, svc.worker_logs())
    assert all(j["report_id"] and j["model_id"] == model_id for j in done["jobs"])
    views = c.get(f"/v1/sweeps/{sweep['id']}/report").json()
    assert views["report_ids"] == [j["report_id"] for j in done["jobs"]]
    (panel,) = views["robustness_curves"]["panels"]
    assert panel["attack"] == "FGSM" and [p["eps"] for p in panel["series"]["RS"]] == [4.0, 8.0]
