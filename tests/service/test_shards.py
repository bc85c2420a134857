"""Sharded evaluation over Celery (issue 10): shards on two real worker processes give the
per-clip outcomes of an unsharded evaluation, progress sums the shards, cancel stops all,
a shard whose worker is killed resumes from its saved chunks, a failed shard fails the
evaluation, and shards stay out of job lists and quotas."""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest

from tests.service.conftest import dataset_location

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUITE = {"attacks": ["fgsm", "pgd5"], "modes": ["R", "S", "RS"], "eps": [8], "seed": 3, "batch_size": 2}


def _setup(svc, root, backend="embedded") -> tuple[str, str]:
    r = svc.client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic",
                                              "location": dataset_location(svc, backend, root)})
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    job = svc.client.post("/v1/jobs", json={"kind": "train", "dataset_id": dataset, "defence": "none",
                                            "epochs": 3, "batch_size": 6}).json()
    done = svc.wait_job(job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    return dataset, done["outputs"]["model_id"]


def _evaluate(svc, model, **extra) -> dict:
    r = svc.client.post("/v1/jobs", json={"kind": "evaluate", "model_id": model, **SUITE, **extra})
    assert r.status_code == 202, r.text
    return r.json()


def _clips(svc, job) -> dict:
    report = job["outputs"]["report_id"]
    table = svc.client.get(f"/v1/reports/{report}/clips", params={"format": "json"}).json()
    order = np.argsort(table["clip"])
    return {k: np.asarray(v)[order].tolist() for k, v in table.items() if isinstance(v, list) and k != "suite"}


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_sharded_equals_unsharded_on_two_workers(backend, live_service, synthetic_root):
    svc = live_service(backend, workers=2)
    _dataset, model = _setup(svc, synthetic_root, backend)
    whole = svc.wait_job(_evaluate(svc, model, shards=1)["id"])
    assert whole["status"] == "succeeded" and whole["shards"] is None
    expected = _clips(svc, whole)
    assert len(expected["clip"]) == 6
    report = svc.client.get(f"/v1/reports/{whole['outputs']['report_id']}").json()
    for shards in ([2, 3] if backend == "embedded" else [3]):
        job = _evaluate(svc, model, shards=shards)
        assert job["status"] == "queued" and len(job["shards"]) == shards
        # progress sums the shards while they run
        seen = svc.wait_job(job["id"], until=lambda j: j["status"] != "queued", timeout=60)
        assert seen["progress"] is None or "fraction" in seen["progress"] or seen["status"] == "succeeded"
        done = svc.wait_job(job["id"], timeout=240)
        assert done["status"] == "succeeded", (done, svc.worker_logs())
        assert [s["status"] for s in done["shards"]] == ["succeeded"] * shards
        assert _clips(svc, done) == expected, f"{shards} shards differ from the unsharded evaluation"
        merged = svc.client.get(f"/v1/reports/{done['outputs']['report_id']}").json()
        assert merged["clean"] == report["clean"] and merged["worst_case"] == report["worst_case"]
        assert merged["config"]["shards"] == shards
        # both workers took shards (each shard names its worker)
        if shards == 3:
            assert len({s["worker"] for s in done["shards"]}) == 2, done["shards"]
        log = svc.client.get(f"/v1/jobs/{job['id']}/log").text
        assert f"----- shard {shards} of {shards}, attempt 1 -----" in log and "----- merge, attempt 1 -----" in log
    # shards are not in the job list (only through parent_id), nor in the quota
    listed = svc.client.get("/v1/jobs").json()
    assert all(j["kind"] in ("train", "evaluate") for j in listed["items"])
    shard_list = svc.client.get("/v1/jobs", params={"parent_id": job["id"]}).json()
    assert shard_list["total"] == 3 and {j["kind"] for j in shard_list["items"]} == {"shard"}
    shard = shard_list["items"][0]
    assert shard["links"]["evaluation"] == f"/v1/jobs/{job['id']}"
    assert svc.client.post(f"/v1/jobs/{shard['id']}/retry").status_code == 409


def test_cancel_stops_every_shard(live_service, synthetic_root):
    svc = live_service("embedded", workers=2)
    _dataset, model = _setup(svc, synthetic_root)
    job = _evaluate(svc, model, shards=3, attacks=["pgd100"])
    svc.wait_job(job["id"], until=lambda j: any(s["status"] == "running" for s in j["shards"]), timeout=60)
    r = svc.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while True:  # queued shards are cancelled at once, running ones at their next step (or they finish)
        shards = svc.client.get(f"/v1/jobs/{job['id']}").json()["shards"]
        if all(s["status"] in ("cancelled", "succeeded") for s in shards):
            break
        assert time.monotonic() < deadline, shards
        time.sleep(0.3)
    assert any(s["status"] == "cancelled" for s in shards), shards
    # retry: the shards run again (with their saved chunks) and the evaluation completes
    r = svc.client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 202, r.text
    done = svc.wait_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, svc.worker_logs())


def test_a_killed_shard_resumes_from_its_saved_chunks(live_service, synthetic_root):
    svc = live_service("embedded", workers=0, heartbeat_timeout_s=3.0)
    first = svc.start_worker()
    svc.wait_workers(1)
    _dataset, model = _setup(svc, synthetic_root)
    job = _evaluate(svc, model, shards=2, attacks=["pgd100"])
    # one worker: the first shard plans, then takes the units one by one; it has saved a
    # third of them when its worker is killed
    svc.wait_job(job["id"], timeout=120, until=lambda j: any(
        s["status"] == "running" and s["fraction"] >= 1 / 3 for s in j["shards"]))
    running = next(s for s in svc.client.get(f"/v1/jobs/{job['id']}").json()["shards"] if s["status"] == "running")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    svc.start_worker()
    done = svc.wait_job(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, svc.worker_logs())
    shard = next(s for s in done["shards"] if s["id"] == running["id"])
    assert shard["attempts"] == 2
    # (attempt 1's log is uploaded every few seconds: its last lines died with it)
    second = svc.client.get(f"/v1/jobs/{shard['id']}/log").text.split("----- attempt 2 -----")[1]
    total, before = map(int, re.search(r"(\d+) units in the plan, (\d+) done by this shard before", second).groups())
    assert before >= total / 3, second[:2000]  # it did not start from zero
    other = next(s for s in done["shards"] if s["id"] != shard["id"])
    after = second + svc.client.get(f"/v1/jobs/{other['id']}/log").text
    redone = re.findall(r"unit (\d+) of \d+ saved", after) + re.findall(r"unit (\d+) was saved before", after)
    # the units done before the kill were not done again; the rest were, once each
    assert len(redone) == len(set(redone)) == total - before, after[-3000:]
    assert "planned" not in second  # the plan survived the kill
    assert sum(s["fraction"] for s in done["shards"]) == pytest.approx(1.0)
    assert len(_clips(svc, done)["clip"]) == 6


def test_units_are_a_queue_each_taken_once(live_service, synthetic_root):
    """Every unit is taken by exactly one shard (a conditional update: workers racing for
    the next unit never both get it), the shards' shares add up, and one plan is used even
    when several shards ran the clean pass."""
    svc = live_service("embedded", workers=2)
    _dataset, model = _setup(svc, synthetic_root)
    done = svc.wait_job(_evaluate(svc, model, shards=5)["id"], timeout=240)
    assert done["status"] == "succeeded", (done, svc.worker_logs())
    shards = svc.client.get("/v1/jobs", params={"parent_id": done["id"]}).json()["items"]
    took = [s["progress"]["units_done"] for s in shards]
    total = shards[0]["progress"]["units"]
    assert sum(took) == total and len(took) == 5, took
    log = svc.client.get(f"/v1/jobs/{done['id']}/log").text
    saved = sorted(int(k) for k in re.findall(r"unit (\d+) of \d+ saved", log))
    assert saved == list(range(1, total + 1))
    planned = log.count("planned")
    assert planned == 1 and log.count("recorded its plan first; using it") <= 4, log[-3000:]


def test_a_failing_shard_fails_the_evaluation(live_service, synthetic_root):
    svc = live_service("embedded", workers=1)
    _dataset, model = _setup(svc, synthetic_root)
    # the model's files disappear: every shard fails to load it
    import shutil

    from robustact.service.store import open_store

    shutil.rmtree(svc.settings.cache_dir / "models", ignore_errors=True)
    store = open_store(svc.settings.store_url)
    store.delete_prefix(f"models/{model}")
    job = _evaluate(svc, model, shards=2)
    done = svc.wait_job(job["id"], timeout=120)
    assert done["status"] == "failed" and done["error"].startswith("shard "), done
    assert {s["status"] for s in done["shards"]} <= {"failed", "cancelled"}


def test_a_sweep_of_sharded_evaluations_runs_and_cancels_with_its_shards(live_service, synthetic_root):
    svc = live_service("embedded", workers=2)
    _dataset, model = _setup(svc, synthetic_root)
    r = svc.client.post("/v1/sweeps", json={"kind": "evaluate", "base": {"model_id": model, **SUITE, "shards": 2},
                                            "grid": {"eps": [[4], [8]]}})
    assert r.status_code == 202, r.text
    sweep = r.json()
    deadline = time.monotonic() + 240
    while (sweep := svc.client.get(f"/v1/sweeps/{sweep['id']}").json())["status"] not in ("succeeded", "failed",
                                                                                         "partial", "cancelled"):
        assert time.monotonic() < deadline, sweep
        time.sleep(0.3)
    assert sweep["status"] == "succeeded" and sweep["counts"]["succeeded"] == 2, sweep
    assert all(j["report_id"] for j in sweep["jobs"])
    for entry in sweep["jobs"]:
        job = svc.client.get(f"/v1/jobs/{entry['id']}").json()
        assert len(job["shards"]) == 2 and job["params"]["shards"] == 2

    r = svc.client.post("/v1/sweeps", json={"kind": "evaluate", "grid": {"eps": [[4], [8]]},
                                            "base": {"model_id": model, **SUITE, "attacks": ["pgd200"], "shards": 3}})
    sweep = r.json()
    svc.wait_job(sweep["jobs"][0]["id"], until=lambda j: any(s["status"] == "running" for s in j["shards"]), timeout=60)
    assert svc.client.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 202
    deadline = time.monotonic() + 60
    while True:
        shards = [s for entry in sweep["jobs"] for s in svc.client.get(f"/v1/jobs/{entry['id']}").json()["shards"]]
        if all(s["status"] in ("cancelled", "succeeded") for s in shards):
            break
        assert time.monotonic() < deadline, shards
        time.sleep(0.3)
    assert any(s["status"] == "cancelled" for s in shards), shards
