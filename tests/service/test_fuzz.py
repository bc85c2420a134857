"""Fuzzing every operation of /openapi.json with schemathesis (issue 9, item 9).

One live service (embedded backend) holds a dataset, a trained tiny model, a report and a
sweep, all made through the API; then its worker is stopped (queued jobs stay queued and
burn no CPU) and every operation gets schema-generated requests, valid and invalid, with
the admin key: schemathesis' boundary cases of every parameter, then random ones. Most of
them name the real ids (path, query and body), so they get past the 404 into the code
behind it. Every answer must be no 5xx (all backends are up, so even a 503 would be a bug;
only /readyz says 503 "not ready", by design, as no worker is left), match the media type and
schema the operation documents for its status, and be JSON ``{"detail": ...}`` when it is
an error.

Operations that destroy what the others need run last (deletions), and keys are only ever
changed or revoked on a throw-away key, so the run never locks itself out. Generation is
derandomised and without a Hypothesis database: the same cases on every run.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, defaultdict

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from robustact.models.data import ntu
from robustact.service.runner import stop_worker
from tests.service.conftest import new_key
from tests.service.test_sweeps import _wait_sweep

# About 45 s on two cores (10 s of them training the model); bounded in CI.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

MIN_CASES = 1000
EXAMPLES_PER_OPERATION = 100  # random ones, after about 1,600 boundary cases over the 43 operations
SUBSTITUTE_OUT_OF_10 = 8  # how often a case names the real ids instead of generated ones
CLIP = "S001C001P003R001A002"  # a test-split clip of the synthetic dataset, for classify
UPLOAD_NAMES = {"video": "clip.avi", "skeleton": "clip.skeleton"}
# Deletions last, each after the operations that need what it deletes: shares, reports,
# then the model (409 while a queued job evaluates it), the dataset (409 while jobs use it)
# and the throw-away key.
DELETE_ORDER = ("/shares/", "/v1/reports/", "/v1/models/", "/v1/datasets/", "/v1/keys/")


def _fixtures(svc, synthetic_root) -> dict[str, dict[str, list]]:
    """Make the rows every operation needs; returns the real values to put in requests, by
    location and parameter name."""
    c = svc.client
    r = c.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic", "location": str(synthetic_root)})
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    r = c.post("/v1/jobs", json={"kind": "train", "dataset_id": dataset_id, "defence": "none", "preset": "tiny",
                                 "epochs": 1, "batch_size": 6, "max_samples": 6})
    assert r.status_code == 202, r.text
    train = svc.wait_job(r.json()["id"])
    assert train["status"] == "succeeded", (train, svc.worker_logs())
    model_id = train["outputs"]["model_id"]
    evaluation = {"model_id": model_id, "attacks": ["fgsm"], "max_samples": 3, "batch_size": 3}  # R, S and RS
    r = c.post("/v1/jobs", json={"kind": "evaluate", **evaluation})
    assert r.status_code == 202, r.text
    evaluate_id = r.json()["id"]
    r = c.post("/v1/sweeps", json={"kind": "evaluate", "name": "fuzz", "base": evaluation, "grid": {"eps": [[4]]}})
    assert r.status_code == 202, r.text
    sweep = _wait_sweep(svc, r.json()["id"])
    assert sweep["status"] == "succeeded", (sweep, svc.worker_logs())
    evaluated = svc.wait_job(evaluate_id)
    assert evaluated["status"] == "succeeded", (evaluated, svc.worker_logs())
    report_id, sweep_report_id = evaluated["outputs"]["report_id"], sweep["jobs"][0]["report_id"]
    document = c.get(f"/v1/reports/{report_id}").json()  # as an inline report of POST /v1/reports/compare

    for process in svc.workers:  # from here on, submitted jobs stay queued
        stop_worker(process)
    r = c.post("/v1/jobs", json={"kind": "evaluate", **evaluation})
    assert r.status_code == 202, r.text
    queued_id = r.json()["id"]
    victim_id, _ = new_key(svc.settings, "fuzz-victim", admin=False)  # the only key fuzzing may change
    r = c.post(f"/v1/models/{model_id}/shares", json={"key_id": victim_id})
    assert r.status_code == 201, r.text

    ids = {"dataset_id": [dataset_id, "tiny3"], "model_id": [model_id], "job_id": [train["id"], evaluate_id, queued_id],
           "report_id": [report_id, sweep_report_id], "sweep_id": [sweep["id"]], "key_id": [victim_id]}
    return {
        "path": {**ids, "grantee": [victim_id, "all"], "name": ["config.json", "model.safetensors"]},
        "query": {"dataset_id": ids["dataset_id"], "model_id": ids["model_id"], "group_id": ids["sweep_id"],
                  "ids": [[report_id], [report_id, sweep_report_id], [f"{report_id},{sweep_report_id}"]],
                  "baseline": [report_id], "attack": ["FGSM"],
                  "eps": [None, 8]},  # None: left out
        "body": {"dataset_id": ids["dataset_id"], "model_id": ids["model_id"], "key_id": [victim_id],
                 "report_ids": [[report_id], [report_id, sweep_report_id]], "reports": [[document]],
                 "baseline": [report_id], "attack": ["FGSM"], "location": [str(synthetic_root)],
                 "grid": [{"seed": [0, 1]}],
                 "video": [(synthetic_root / ntu.RGB_DIR / f"{CLIP}{ntu.VIDEO_SUFFIX}").read_bytes()],
                 "skeleton": [(synthetic_root / ntu.SKELETON_DIR / f"{CLIP}{ntu.SKELETON_SUFFIX}").read_bytes()]},
    }


_idempotency_keys = itertools.count()


def _uploads_as_files(document: dict) -> dict:
    """The OpenAPI document with the classify uploads spelled so that schemathesis sends
    them as files, named by their format. FastAPI documents an optional ``UploadFile`` as
    ``anyOf: [file, null]``, and schemathesis sends a property as a file only when its
    schema is the file schema itself; otherwise it goes as a plain form field, which FastAPI
    refuses (422) before the decoder ever sees the bytes."""
    for path_item in document["paths"].values():
        for operation in path_item.values():
            content = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if content is None:
                continue
            properties = document["components"]["schemas"][content["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
            for name, filename in UPLOAD_NAMES.items():
                properties[name] = next(s for s in properties[name]["anyOf"] if s.get("type") == "string")
                content.setdefault("encoding", {})[name] = {"headers": {"Content-Disposition": {
                    "schema": {"type": "string"}, "example": f'form-data; name="{name}"; filename="{filename}"'}}}
    return document


def _substitute(case, real: dict[str, dict[str, list]], pick: int) -> None:
    """Put the real values (the ``pick``-th candidate) into the parameters ``case`` has,
    except the one a negative case is about."""
    data = case.meta.phase.data if case.meta is not None else None
    location = getattr(data, "parameter_location", None)
    negated = (location.value, data.parameter) if location is not None else None
    for where, values in (("path", case.path_parameters), ("query", case.query),
                          ("body", case.body if isinstance(case.body, dict) else None)):
        for name in list(values or {}):
            if name in real[where] and negated != (where, name):
                options = real[where][name]
                values[name] = options[pick % len(options)]
    if case.headers and "Idempotency-Key" in case.headers and negated != ("header", "Idempotency-Key"):
        # a fresh key: one reused with another body is a 409
        case.headers["Idempotency-Key"] = f"fuzz-{next(_idempotency_keys)}"
    base = case.body.get("base") if isinstance(case.body, dict) else None
    if isinstance(base, dict):  # a sweep: name the real model or dataset
        base.update(model_id=real["body"]["model_id"][0], dataset_id=real["body"]["dataset_id"][0])


def error_is_json(ctx, response, case) -> None:
    """An error answer is JSON with a ``detail`` (what clients and the CLI print); /readyz
    answers its own document, also when it is a 503."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), f"{response.status_code} answered as {content_type!r}"
    body = json.loads(response.content)
    not_ready = case.operation.path == "/readyz" and response.status_code == 503
    keys = ("status", "checks") if not_ready else ("detail",)
    assert isinstance(body, dict) and all(k in body for k in keys), f"{response.status_code} without {keys}: {body!r}"
    return None


# Status codes are not checked against the documented ones: every /v1 operation documents
# 401, 422 and 503, and its routes the codes particular to them, but not each 404, 409 or a
# parse error's 400.
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, error_is_json]


def _order(operation) -> tuple:
    if operation.method.upper() != "DELETE":
        return (0, 0)
    return (1, next(i for i, part in enumerate(DELETE_ORDER + ("",)) if part in operation.path))


def test_fuzz_every_operation(live_service, synthetic_root):
    t0 = time.monotonic()
    svc = live_service("embedded", workers=1, max_active_jobs=100_000, max_active_sweeps=100_000)
    real = _fixtures(svc, synthetic_root)
    t_fixtures = time.monotonic()

    # The key goes in every request (below); generating the security header would only
    # drop it from a third of the invalid requests, which then all stop at the 401.
    # /readyz says 503 "not ready" by design: the worker is stopped.
    not_ready = {"not_a_server_error": {"expected-statuses": ["2xx", "4xx", "503"]}}
    config = schemathesis.Config.from_dict({"base-url": svc.url, "generation": {"with-security-parameters": False},
                                            "operations": [{"include-path": "/readyz", "checks": not_ready}]})
    document = _uploads_as_files(requests.get(f"{svc.url}/openapi.json", timeout=30).json())
    schema = schemathesis.openapi.from_dict(document, config=config)
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=_order)
    auth = {"Authorization": svc.client.headers["Authorization"]}
    session = requests.Session()
    statuses: dict[str, Counter] = defaultdict(Counter)
    failures: dict[tuple, str] = {}

    def send(case, pick: int) -> None:
        label = case.operation.label
        if pick < SUBSTITUTE_OUT_OF_10:
            _substitute(case, real, pick)
        try:
            response = case.call(session=session, headers=auth, timeout=60)
        except requests.RequestException as e:
            failures.setdefault((label, type(e).__name__), f"{case.as_curl_command(headers=auth)}\n{e}")
            return
        statuses[label][response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except FailureGroup as group:
            for failure in group.exceptions:
                failures.setdefault((label, failure.title, response.status_code), group.message[:3000])

    for operation in operations:
        # Boundary values and wrong types of every parameter (schemathesis' coverage phase),
        # then random valid and invalid requests.
        modes = list(schemathesis.GenerationMode)
        generation = schema.config.generation_for(operation=operation)
        for i, case in enumerate(schema.iter_coverage_cases(operation, generation_modes=modes,
                                                            generation_config=generation)):
            send(case, i % 10)

        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                             verbosity=hypothesis.Verbosity.quiet)
        @hypothesis.given(case=st.one_of(*(operation.as_strategy(mode) for mode in modes)), pick=st.integers(0, 9))
        def fuzz(case, pick):
            send(case, pick)

        fuzz()

    total = sum(sum(c.values()) for c in statuses.values())
    elapsed = time.monotonic() - t_fixtures
    print(f"\nfixtures {t_fixtures - t0:.0f}s; {total} cases over {len(operations)} operations in {elapsed:.0f}s")
    for label, counts in statuses.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(f"{key}:\n{message}" for key, message in failures.items())
    assert total >= MIN_CASES, total
    only_404 = [label for label, counts in statuses.items() if not set(counts) - {404, 405}]
    assert not only_404, f"never got past the 404: {only_404}"
