"""Every request field has a bound, checked by the schema (so OpenAPI shows it): a request
just over a bound is a 422 whose ``loc`` names the field and creates nothing; a request at
the bound passes the schema (through pydantic, or a 404 for an unknown model over HTTP)."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import TypeAdapter, ValidationError

from robustact.models.config import MAX_QUERIES, MAX_STEPS
from robustact.models.evaluate import ATTACK_SPEC_MAX_LENGTH, ATTACK_SPEC_PATTERN
from robustact.service.schemas import (MAX_ATTACKS, MAX_BASE_FIELDS, MAX_BUDGETS, MAX_COMPARE, MAX_GRID_FIELDS, MAX_GRID_VALUES,
                             MAX_ID_LENGTH, MAX_LAMBDA, MAX_LOCATION_LENGTH, MAX_SAMPLES, MAX_SEED, MAX_SUITE,
                             AttackSpec, CompareRequest, EvaluateJobCreate, SweepCreate, TrainJobCreate)
from tests.test_evaluate import accepted_by_the_engine, attack_spec_candidates

NAN, INF = float("nan"), float("inf")
# MAX_SUITE attack configs either way: 16 attacks × 1 mode × 4 ε, or 4 attacks × 1 mode × 16 ε.
SIXTEEN_ATTACKS = [f"pgd{k}" for k in range(1, MAX_ATTACKS + 1)]
SIXTEEN_BUDGETS = [float(e) for e in range(1, MAX_BUDGETS + 1)]
LONG_ID = "x" * (MAX_ID_LENGTH + 1)


def post(client, path: str, body: dict):
    """POST ``body`` as Python's json writes it: NaN and Infinity stay tokens (httpx's own
    encoder refuses them), as a client in another language could send them."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def job_total(client) -> int:
    r = client.get("/v1/jobs", params={"limit": 1})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def assert_refused(client, path: str, body: dict, field: str) -> None:
    r = post(client, path, body)
    assert r.status_code == 422, f"{field}: {r.status_code} {r.text[:300]}"
    locs = [[str(part) for part in error["loc"]] for error in r.json()["detail"]]
    assert any(loc[0] == "body" and field in loc for loc in locs), (field, locs)


# --------------------------------------------------------------------------- over HTTP: 422


EVALUATE_OVER = {
    # The measured request of issue 8: 1000 attacks × 100 ε in 8 KB.
    "the 8 KB request": ({"attacks": ["fgsm"] * 1000, "eps": [8] * 100}, "attacks"),
    "17 attacks": ({"attacks": SIXTEEN_ATTACKS + ["fgsm"], "modes": ["RS"], "eps": [8]}, "attacks"),
    "pgd999999999": ({"attacks": ["pgd999999999"]}, "attacks"),
    "pgd1001": ({"attacks": [f"pgd{MAX_STEPS + 1}"]}, "attacks"),
    "cw1001": ({"attacks": [f"cw{MAX_STEPS + 1}"]}, "attacks"),
    "apgd-ce1001": ({"attacks": [f"apgd-ce{MAX_STEPS + 1}"]}, "attacks"),
    "apgd-dlr1001": ({"attacks": [f"apgd-dlr{MAX_STEPS + 1}"]}, "attacks"),
    "square10001": ({"attacks": [f"square{MAX_QUERIES + 1}"]}, "attacks"),
    "upper case": ({"attacks": ["PGD20"]}, "attacks"),
    "repeated attack": ({"attacks": ["fgsm", "fgsm"]}, "attacks"),
    "suite of 72": ({"attacks": ["autoattack", "fgsm", "pgd20", "cw30"], "modes": ["R", "S", "RS"],
                     "eps": [2, 4, 6, 8]}, "attacks"),
    "suite of 80": ({"attacks": SIXTEEN_ATTACKS[:MAX_SUITE // MAX_BUDGETS + 1], "modes": ["RS"],
                     "eps": SIXTEEN_BUDGETS}, "attacks"),
    "17 budgets": ({"attacks": ["fgsm"], "modes": ["RS"], "eps": SIXTEEN_BUDGETS + [0.5]}, "eps"),
    "repeated budget": ({"eps": [8, 8.0]}, "eps"),
    "4 modes": ({"modes": ["R", "S", "RS", "R"]}, "modes"),
    "repeated mode": ({"modes": ["R", "R"]}, "modes"),
    "NaN budget": ({"eps": [NAN]}, "eps"),
    "infinite alpha": ({"alpha": INF}, "alpha"),
    "NaN seed": ({"seed": NAN}, "seed"),
    "-Infinity batch size": ({"batch_size": -INF}, "batch_size"),
    "NaN alpha": ({"alpha": NAN}, "alpha"),
    "seed over int32": ({"seed": MAX_SEED + 1}, "seed"),
    "negative seed": ({"seed": -1}, "seed"),
    "max_samples": ({"max_samples": MAX_SAMPLES + 1}, "max_samples"),
    "long model id": ({"model_id": LONG_ID}, "model_id"),
    "long dataset id": ({"dataset_id": LONG_ID}, "dataset_id"),
    "restarts": ({"restarts": 101}, "restarts"),
}

TRAIN_OVER = {
    "steps": ({"attack": {"steps": MAX_STEPS + 1}}, "steps"),
    "lam": ({"lam": MAX_LAMBDA * 1.001}, "lam"),
    "infinite lam": ({"lam": INF}, "lam"),
    "NaN lr": ({"lr": NAN}, "lr"),
    "infinite attack alpha": ({"attack": {"alpha": INF}}, "alpha"),
    "NaN attack eps": ({"attack": {"eps": NAN}}, "eps"),
    "seed over int32": ({"seed": 2**31}, "seed"),
    "max_samples": ({"max_samples": MAX_SAMPLES + 1}, "max_samples"),
    "long dataset id": ({"dataset_id": LONG_ID}, "dataset_id"),
    "long name": ({"name": LONG_ID}, "name"),
    "epochs": ({"epochs": 1001}, "epochs"),
}


def test_job_fields_over_their_bounds_are_422_and_create_nothing(live_service):
    service = live_service(workers=0)
    c = service.client
    before = job_total(c)
    for case, (change, field) in EVALUATE_OVER.items():
        assert_refused(c, "/v1/jobs", {"kind": "evaluate", "model_id": "nope", **change}, field)
    for case, (change, field) in TRAIN_OVER.items():
        assert_refused(c, "/v1/jobs", {"kind": "train", "dataset_id": "nope", **change}, field)
    assert job_total(c) == before
    # At the bounds the schema lets the body through: the unknown model is what stops it.
    for change in ({"attacks": SIXTEEN_ATTACKS, "modes": ["RS"], "eps": [2, 4, 6, 8]},
                   {"attacks": [f"pgd{MAX_STEPS}", f"cw{MAX_STEPS}", f"apgd-ce{MAX_STEPS}", f"square{MAX_QUERIES}"],
                    "modes": ["RS"], "eps": SIXTEEN_BUDGETS, "seed": MAX_SEED, "max_samples": MAX_SAMPLES}):
        r = post(c, "/v1/jobs", {"kind": "evaluate", "model_id": "nope", **change})
        assert r.status_code == 404 and "model 'nope'" in r.json()["detail"], r.text
    r = post(c, "/v1/jobs", {"kind": "train", "dataset_id": "nope", "lam": MAX_LAMBDA, "seed": MAX_SEED,
                             "attack": {"steps": MAX_STEPS}})
    assert r.status_code == 404, r.text
    assert job_total(c) == before


def test_sweep_compare_and_dataset_fields_over_their_bounds_are_422(live_service):
    service = live_service(workers=0)
    c = service.client
    before = job_total(c)
    sweep = {"kind": "evaluate", "base": {"model_id": "nope"}}
    assert_refused(c, "/v1/sweeps", {**sweep, "grid": {f"f{i}": [0] for i in range(MAX_GRID_FIELDS + 1)}}, "grid")
    assert_refused(c, "/v1/sweeps", {**sweep, "grid": {"seed": list(range(MAX_GRID_VALUES + 1))}}, "grid")
    assert_refused(c, "/v1/sweeps", {**sweep, "base": {f"f{i}": 0 for i in range(MAX_BASE_FIELDS + 1)},
                                     "grid": {"seed": [0]}}, "base")
    assert_refused(c, "/v1/sweeps", {**sweep, "name": LONG_ID, "grid": {"seed": [0]}}, "name")
    assert_refused(c, "/v1/sweeps", {**sweep, "grid": {"alpha": [1, NAN]}}, "alpha")
    # A combination is a job body like any other: its suite is bounded too.
    assert_refused(c, "/v1/sweeps", {**sweep, "grid": {"eps": [SIXTEEN_BUDGETS]}}, "attacks")
    assert c.get("/v1/sweeps").json()["total"] == 0 and job_total(c) == before

    ids = [f"r{i}" for i in range(MAX_COMPARE + 1)]
    assert_refused(c, "/v1/reports/compare", {"report_ids": ids}, "report_ids")
    assert_refused(c, "/v1/reports/compare", {"reports": [{}] * (MAX_COMPARE + 1)}, "reports")
    assert_refused(c, "/v1/reports/compare", {"report_ids": ids[:40], "reports": [{}] * 30}, "reports")
    assert_refused(c, "/v1/reports/compare", {"report_ids": [LONG_ID]}, "report_ids")
    assert_refused(c, "/v1/reports/compare", {"report_ids": ["r"], "eps": NAN}, "eps")
    assert_refused(c, "/v1/reports/compare", {"reports": [{"clean": {"accuracy": INF}}]}, "accuracy")
    assert_refused(c, "/v1/reports/compare", {"report_ids": ["r"], "baseline": LONG_ID}, "baseline")

    location = "/" + "d" * MAX_LOCATION_LENGTH
    assert_refused(c, "/v1/datasets", {"name": "x", "format": "synthetic", "location": location}, "location")
    assert_refused(c, "/v1/datasets", {"name": LONG_ID, "format": "synthetic", "location": "/data"}, "name")
    assert c.get("/v1/datasets").json()["items"] == []


def test_the_bounds_are_in_the_openapi_document(live_service):
    service = live_service(workers=0)
    r = service.client.get("/openapi.json")
    assert r.status_code == 200
    schemas = r.json()["components"]["schemas"]
    evaluate = schemas["EvaluateJobCreate"]["properties"]
    assert evaluate["attacks"]["maxItems"] == MAX_ATTACKS and evaluate["attacks"]["uniqueItems"] is True
    assert evaluate["attacks"]["items"]["pattern"] == ATTACK_SPEC_PATTERN
    assert evaluate["attacks"]["items"]["maxLength"] == ATTACK_SPEC_MAX_LENGTH
    assert evaluate["eps"]["maxItems"] == MAX_BUDGETS and evaluate["modes"]["maxItems"] == 3
    assert evaluate["modes"]["uniqueItems"] is True
    assert evaluate["seed"]["maximum"] == 2**31 - 1 and evaluate["max_samples"]["anyOf"][0]["maximum"] == MAX_SAMPLES
    assert evaluate["model_id"]["maxLength"] == MAX_ID_LENGTH
    train = schemas["TrainJobCreate"]["properties"]
    assert train["lam"]["maximum"] == MAX_LAMBDA and train["seed"]["maximum"] == MAX_SEED
    assert schemas["AttackRecipe"]["properties"]["steps"]["maximum"] == MAX_STEPS
    grid = schemas["SweepCreate"]["properties"]["grid"]
    assert grid["maxProperties"] == MAX_GRID_FIELDS and grid["additionalProperties"]["maxItems"] == MAX_GRID_VALUES
    assert schemas["SweepCreate"]["properties"]["base"]["maxProperties"] == MAX_BASE_FIELDS
    compare = schemas["CompareRequest"]["properties"]
    assert compare["report_ids"]["maxItems"] == MAX_COMPARE and compare["reports"]["maxItems"] == MAX_COMPARE
    assert schemas["DatasetCreate"]["properties"]["location"]["maxLength"] == MAX_LOCATION_LENGTH


# --------------------------------------------------------------------------- the schema at the bounds


def evaluate_body(**change) -> dict:
    return {"kind": "evaluate", "model_id": "m", **change}


@pytest.mark.parametrize("change", [
    {"attacks": SIXTEEN_ATTACKS, "modes": ["RS"], "eps": [2, 4, 6, 8]},
    {"attacks": ["fgsm", "pgd20", "cw30", "autoattack"], "modes": ["R"], "eps": SIXTEEN_BUDGETS[:10]},  # 60
    {"attacks": ["autoattack"], "modes": ["R", "S", "RS"], "eps": SIXTEEN_BUDGETS[:7]},  # 63
    {"attacks": [f"pgd{MAX_STEPS}", f"cw{MAX_STEPS}", f"apgd-ce{MAX_STEPS}", f"apgd-dlr{MAX_STEPS}",
                 f"square{MAX_QUERIES}"], "modes": ["R", "S", "RS"], "eps": [4, 8]},
    {"seed": MAX_SEED, "max_samples": MAX_SAMPLES, "alpha": 255, "eps": [0, 255], "restarts": 100},
    {"model_id": "m" * MAX_ID_LENGTH, "dataset_id": "d" * MAX_ID_LENGTH},
])
def test_evaluation_bodies_at_the_bounds_pass_the_schema(change):
    body = EvaluateJobCreate.model_validate(evaluate_body(**change))
    assert body.model_dump(include=set(change)) == change


def test_suite_size_counts_presets_modes_and_budgets():
    # 5 attack strings × 3 modes × 4 ε is 60, but autoattack is 3 attacks: 7 × 3 × 4 = 84.
    with pytest.raises(ValidationError) as caught:
        EvaluateJobCreate.model_validate(evaluate_body(attacks=["autoattack"] + SIXTEEN_ATTACKS[:4], eps=[2, 4, 6, 8]))
    error, = caught.value.errors()
    assert error["loc"] == ("attacks",) and "at most 64" in error["msg"] and "autoattack counting 3" in error["msg"]


def test_other_bodies_at_the_bounds_pass_the_schema():
    assert TrainJobCreate.model_validate({"kind": "train", "dataset_id": "d" * MAX_ID_LENGTH, "lam": MAX_LAMBDA,
                                          "seed": MAX_SEED, "max_samples": MAX_SAMPLES,
                                          "attack": {"steps": MAX_STEPS}}).attack.steps == MAX_STEPS
    ids = [f"r{i}" for i in range(MAX_COMPARE)]
    assert len(CompareRequest.model_validate({"report_ids": ids}).report_ids) == MAX_COMPARE
    half = MAX_COMPARE // 2
    assert CompareRequest.model_validate({"report_ids": ids[:half], "reports": [{}] * half})
    grid = {f"f{i}": [0] for i in range(MAX_GRID_FIELDS - 1)} | {"seed": list(range(MAX_GRID_VALUES))}
    sweep = SweepCreate.model_validate({"kind": "train", "base": {f"f{i}": 0 for i in range(MAX_BASE_FIELDS)},
                                        "grid": grid})
    assert len(sweep.grid) == MAX_GRID_FIELDS


def test_the_schema_pattern_admits_exactly_what_the_engine_parses():
    """The API's check of an attack string (pydantic's regex engine) and the CLI's
    (parse_attack_spec) agree, string for string."""
    adapter = TypeAdapter(AttackSpec)
    for spec in attack_spec_candidates():
        try:
            adapter.validate_python(spec)
            admitted = True
        except ValidationError:
            admitted = False
        assert admitted == accepted_by_the_engine(spec), spec[:40]
        assert admitted == bool(re.fullmatch(ATTACK_SPEC_PATTERN, spec)), spec[:40]
