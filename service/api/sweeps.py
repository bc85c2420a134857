"""/v1/sweeps: one request launches a group of jobs over a grid, followed, cancelled and
reported on as one.

A sweep is ``base`` (a train or evaluate job body) with every combination of the ``grid``
values laid over it (cartesian product), optionally crossed with the rows of a preset
(``table4``: AMRs 0–3 and amr-frozen, ``table5``: λ ∈ {0.1, 0.5, 1, 2, 5}). Every combination is validated
by the same code as ``POST /v1/jobs`` before anything is written (one bad combination is a
422 naming the field, and nothing is created); then the group and all its jobs are
committed in one transaction and sent to the broker.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select, update

from robustact.service.api.deps import CeleryDep, SessionDep, SettingsDep, StoreDep, invalid
from robustact.service.api.jobs import check_quota, new_job, submit_jobs
from robustact.service.shards import cancel_parent
from robustact.service.api.reports import render_views, report_document
from robustact.service.auth import Caller, CallerDep, get_visible, scoped
from robustact.service.db import FINISHED, Job, JobGroup, Model, Report, new_id, utcnow
from robustact.service.idempotency import IdempotencyHeader, create_once, remember
from robustact.service.schemas import MAX_OFFSET
from robustact.service.schemas import (EvaluateJobCreate, Links, SweepCounts, SweepCreate, SweepJob, SweepList, SweepPublic,
                             TrainJobCreate)

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

MAX_SWEEP_JOBS = 64

# The paper's ablations as rows of fixed values (not a product): Table 4 varies the number
# of AMRs (0 is adversarial training of both modalities without AMR), Table 5 the AMR loss
# weight λ with one AMR.
PRESETS: dict[str, list[dict[str, Any]]] = {
    "table4": [{"defence": "at-rs", "num_amr": 0}] + [{"defence": "amr", "num_amr": n} for n in (1, 2, 3)]
    + [{"defence": "amr-frozen", "num_amr": 3}],
    "table5": [{"defence": "amr", "num_amr": 1, "lam": lam} for lam in (0.1, 0.5, 1.0, 2.0, 5.0)],
}
SCHEMAS = {"train": TrainJobCreate, "evaluate": EvaluateJobCreate}
ADAPTERS = {kind: TypeAdapter(schema) for kind, schema in SCHEMAS.items()}


# --------------------------------------------------------------------------- expansion


def _label(varied: dict[str, Any]) -> str:
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in varied.items())


def expand(body: SweepCreate) -> list[dict[str, Any]]:
    """The varied values of every job, in order: preset rows × grid product (the grid's
    last field varies fastest). Checks the fields and the size, not the values."""
    fields = set(SCHEMAS[body.kind].model_fields) - {"kind"}
    if body.preset is not None and body.kind != "train":
        invalid("preset", f"preset {body.preset!r} is a set of training jobs; use it with kind 'train'", body.preset)
    if "kind" in body.base and body.base["kind"] != body.kind:
        invalid(("base", "kind"), f"the base is a {body.kind} job body (the sweep's kind)", body.base["kind"])
    rows = PRESETS[body.preset] if body.preset else [{}]
    preset_fields = set(rows[0])
    for field, values in body.grid.items():
        if field not in fields:
            invalid(("grid", field), f"not a field of a {body.kind} job; one of: {', '.join(sorted(fields))}")
        if field in preset_fields:
            invalid(("grid", field), f"set by preset {body.preset!r}; leave it out of the grid")
        if not values:
            invalid(("grid", field), "give at least one value", values)
    if not body.grid and body.preset is None:
        invalid("grid", "give a grid (field → list of values) or a preset", body.grid)
    size = len(rows) * math.prod(len(v) for v in body.grid.values())
    if size > MAX_SWEEP_JOBS:
        invalid("grid", f"the sweep would make {size} jobs; at most {MAX_SWEEP_JOBS} per sweep", size)
    fields_order = list(body.grid)
    return [{**row, **dict(zip(fields_order, combo))}
            for row in rows for combo in itertools.product(*body.grid.values())]


def _where(field: str, varied: dict[str, Any]) -> tuple[str, ...]:
    return ("grid", field) if field in varied else ("base", field)


def _job_body(body: SweepCreate, varied: dict[str, Any]) -> dict[str, Any]:
    job = {**body.base, **varied, "kind": body.kind}
    if body.kind == "train" and body.base.get("name"):  # one model name per combination
        job["name"] = f"{body.base['name']}[{_label(varied)}]"[:200]
    return job


def build_jobs(session, body: SweepCreate, caller: Caller) -> list[tuple[dict[str, Any], Job]]:
    """Validate every combination like ``POST /v1/jobs`` does and make its row; the first
    bad one is a 422 whose ``loc`` is ``body.grid.<field>`` or ``body.base.<field>`` and
    whose message names the combination. Nothing is added to the session."""
    out = []
    for index, varied in enumerate(expand(body)):
        where = f"combination {index} ({_label(varied) or 'preset row'})"
        try:
            request = ADAPTERS[body.kind].validate_python(_job_body(body, varied))
        except ValidationError as e:
            raise RequestValidationError([
                {**err, "loc": ("body", *_where(str(err["loc"][0]), varied), *err["loc"][1:]),
                 "msg": f"{where}: {err['msg']}"} for err in e.errors(include_url=False)])
        try:
            job = new_job(session, request, caller)
        except RequestValidationError as e:
            raise RequestValidationError([
                {**err, "loc": ("body", *_where(str(err["loc"][1]), varied), *err["loc"][2:]),
                 "msg": f"{where}: {err['msg']}"} for err in e.errors()])
        except HTTPException as e:  # an unknown dataset or model
            raise HTTPException(status_code=e.status_code, detail=f"{where}: {e.detail}")
        out.append((varied, job))
    return out


# --------------------------------------------------------------------------- status


def overall_status(counts: SweepCounts, total: int) -> str:
    active = counts.queued + counts.running
    if active:
        return "queued" if counts.queued == total else "running"
    for status in FINISHED:
        if getattr(counts, status) == total:
            return status
    return "partial" if counts.succeeded else "failed"


def _jobs(session, group_id: str) -> list[Job]:
    jobs = session.scalars(select(Job).where(Job.group_id == group_id)).all()
    return sorted(jobs, key=lambda j: ((j.params.get("sweep") or {}).get("index", 0), j.created_at, j.id))


def sweep_public(session, group: JobGroup, with_jobs: bool = True) -> SweepPublic:
    jobs = _jobs(session, group.id)
    ids = [j.id for j in jobs]
    counts = SweepCounts(**Counter(j.status for j in jobs))
    models, reports = {}, {}
    if with_jobs and ids:
        models = dict(session.execute(select(Model.job_id, Model.id).where(Model.job_id.in_(ids))).all())
        reports = dict(session.execute(select(Report.job_id, Report.id).where(Report.job_id.in_(ids))).all())
    items = None
    if with_jobs:
        items = []
        for job in jobs:
            sweep = job.params.get("sweep") or {}
            model_id = models.get(job.id) if job.kind == "train" else job.model_id
            links = {"self": f"/v1/jobs/{job.id}"}
            if model_id:
                links["model"] = f"/v1/models/{model_id}"
            if reports.get(job.id):
                links["report"] = f"/v1/reports/{reports[job.id]}"
            items.append(SweepJob(id=job.id, index=sweep.get("index", len(items)), varied=sweep.get("varied", {}),
                                  status=job.status, model_id=model_id, report_id=reports.get(job.id),
                                  error=job.error, links=Links(**links)))
    status = overall_status(counts, len(jobs))
    links = {"self": f"/v1/sweeps/{group.id}", "jobs": f"/v1/jobs?group_id={group.id}",
             "report": f"/v1/sweeps/{group.id}/report", "report_html": f"/v1/sweeps/{group.id}/report?format=html"}
    if status in ("queued", "running"):
        links["cancel"] = f"/v1/sweeps/{group.id}/cancel"
    combinations = group.grid.get("combinations", [])
    axes: dict[str, list[Any]] = {}
    for varied in combinations:
        for k, v in varied.items():
            if v not in axes.setdefault(k, []):
                axes[k].append(v)
    return SweepPublic(id=group.id, name=group.name, kind=group.kind, status=status, counts=counts, total=len(jobs),
                       preset=group.grid.get("preset"), grid=axes, base=group.grid.get("base", {}),
                       created_at=group.created_at, jobs=items, links=Links(**links))


# --------------------------------------------------------------------------- routes


@router.post("", status_code=202, response_model=SweepPublic,
             responses={429: {"description": "the key's quota of active sweeps is used up"}})
def create_sweep(body: SweepCreate, caller: CallerDep, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
                 response: Response, idempotency_key: str | None = IdempotencyHeader):
    """Validate every combination, then create the group and its jobs at once and queue them."""
    route = "POST /v1/sweeps"

    def create(digest: str) -> SweepPublic:
        built = build_jobs(session, body, caller)
        check_quota(session, caller, settings, sweeps=1)
        name = body.name or body.preset or f"{body.kind} over {' × '.join(body.grid)}"
        group = JobGroup(id=new_id(), name=name[:200], kind=body.kind, owner_id=caller.id,
                         grid={"preset": body.preset, "base": body.base, "grid": body.grid,
                               "combinations": [varied for varied, _ in built]})
        jobs = []
        for index, (varied, job) in enumerate(built):
            job.params = {**job.params, "sweep": {"group_id": group.id, "index": index, "varied": varied}}
            jobs.append(job)
        remember(session, caller, idempotency_key, route, digest, f"sweeps/{group.id}")
        submit_jobs(session, celery, jobs, group=group)
        return sweep_public(session, group)

    def replay(resource: str) -> SweepPublic:
        return sweep_public(session, get_visible(session, JobGroup, resource.split("/", 1)[1], caller, "sweep"))

    result = create_once(session, caller, idempotency_key, route, body.model_dump(mode="json"), create, replay)
    response.headers["Location"] = f"/v1/sweeps/{result.id}"
    return result


@router.get("", response_model=SweepList)
def list_sweeps(caller: CallerDep, session: SessionDep, kind: Literal["train", "evaluate"] | None = None,
                limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0, le=MAX_OFFSET, description="rows to skip")):
    """Sweeps, newest first, with their status and counts (their jobs: ``GET /v1/sweeps/{id}``)."""
    query = scoped(select(JobGroup), JobGroup, caller)
    if kind is not None:
        query = query.where(JobGroup.kind == kind)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    groups = session.scalars(query.order_by(JobGroup.created_at.desc(), JobGroup.id).limit(limit)
                             .offset(offset)).all()
    return SweepList(items=[sweep_public(session, g, with_jobs=False) for g in groups], total=total, limit=limit,
                     offset=offset)


@router.get("/{sweep_id}", response_model=SweepPublic)
def get_sweep(sweep_id: str, caller: CallerDep, session: SessionDep):
    return sweep_public(session, get_visible(session, JobGroup, sweep_id, caller, "sweep"))


@router.post("/{sweep_id}/cancel", status_code=202, response_model=SweepPublic)
def cancel_sweep(sweep_id: str, caller: CallerDep, session: SessionDep):
    """Queued jobs are cancelled at once, running ones stop at their worker's next step;
    finished jobs are left as they are."""
    group = get_visible(session, JobGroup, sweep_id, caller, "sweep")
    sharded = session.scalars(select(Job).where(Job.group_id == sweep_id, Job.shard_count.is_not(None),
                                                Job.status.in_(("queued", "running")))).all()
    for parent in sharded:  # a sharded evaluation: its shards too
        cancel_parent(session, parent)
    result = session.execute(update(Job).where(Job.group_id == sweep_id, Job.status == "queued").values(
        status="cancelled", cancel_requested=True, finished_at=utcnow()))
    running = session.execute(update(Job).where(Job.group_id == sweep_id, Job.status == "running").values(
        cancel_requested=True))
    session.commit()
    if result.rowcount == 0 and running.rowcount == 0 and not sharded:
        raise HTTPException(status_code=409, detail=f"sweep {sweep_id!r} has no queued or running job left")
    session.expire_all()
    return sweep_public(session, group)


def _merge(documents: list[dict]) -> dict:
    """Reports of one model on the same data (e.g. one per ε) as one document: the attack
    entries of all of them (the first per label and budget), in label then ε order."""
    entries: dict[tuple, dict] = {}
    for doc in documents:
        for entry in doc["attacks"]:
            entries.setdefault((entry["label"], entry.get("eps_rgb"), entry.get("eps_skel")), entry)
    labels = list(dict.fromkeys(label for label, _, _ in entries))
    ordered = sorted(entries.items(), key=lambda kv: (labels.index(kv[0][0]), kv[0][1] or 0, kv[0][2] or 0))
    return {**documents[0], "attacks": [entry for _, entry in ordered]}


def _evaluation_key(job: Job | None, row: Report) -> tuple:
    if job is None:
        return ("report", row.id)
    p = job.params
    return (row.model_id, row.dataset_id, p.get("protocol"), p.get("split"), p.get("max_samples"), p.get("seed"))


@router.get("/{sweep_id}/report", responses={200: {"content": {"text/html": {}},
                                                   "description": "robustact.views/v1 JSON, or the HTML page"}})
def sweep_report(sweep_id: str, caller: CallerDep, session: SessionDep, store: StoreDep,
                 format: Literal["json", "html"] = "json",
                 attack: str | None = Query(None, description="attack label of Table 2 (default: PGD20 when present, "
                                                              "else the first label)"),
                 baseline: str | None = Query(None, description="Table-2 baseline: a report, job or model id of "
                                                                "the sweep (default: the undefended model, else the "
                                                                "first)"),
                 eps: float | None = Query(None, ge=0, le=255, description="Table-2 budget in 1/255 units"),
                 title: str | None = Query(None, max_length=200)):
    """The combined report of the sweep: Figure 2, Tables 1–3 and Figure 4 (``models.views``)
    over the reports of its evaluation jobs (evaluate sweep) or of the evaluations of the
    models it trained (train sweep). Evaluations of one model on the same data are merged,
    so an ε sweep draws one curve per model."""
    group = get_visible(session, JobGroup, sweep_id, caller, "sweep")
    jobs = _jobs(session, group.id)
    order = {j.id: i for i, j in enumerate(jobs)}
    if group.kind == "evaluate":
        rows = session.scalars(scoped(select(Report), Report, caller).where(Report.job_id.in_(order))).all()
        rows = sorted(rows, key=lambda r: (order[r.job_id], r.created_at))
        if not rows:
            counts = Counter(j.status for j in jobs)
            raise HTTPException(status_code=409, detail=f"sweep {sweep_id!r} has no finished evaluation yet ("
                                + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    else:
        models = session.execute(select(Model.id, Model.job_id).where(Model.job_id.in_(order))).all()
        model_order = {m: order[j] for m, j in models}
        rows = session.scalars(scoped(select(Report), Report, caller).where(
            Report.model_id.in_(model_order))).all() if models else []
        rows = sorted(rows, key=lambda r: (model_order[r.model_id], r.created_at, r.id))
        if not rows:
            what = (f"its models ({', '.join(sorted(model_order, key=model_order.get))}) have no evaluation "
                    "report yet; evaluate them, e.g. POST /v1/sweeps {\"kind\": \"evaluate\", \"base\": {...}, "
                    "\"grid\": {\"model_id\": [...]}}") if models else "none of its jobs has produced a model yet"
            raise HTTPException(status_code=409, detail=f"train sweep {sweep_id!r} has no report to combine: {what}")
    evaluations = {j.id: j for j in session.scalars(select(Job).where(
        Job.id.in_([r.job_id for r in rows if r.job_id]))).all()}
    groups: dict[tuple, list[Report]] = {}
    for row in rows:
        groups.setdefault(_evaluation_key(evaluations.get(row.job_id), row), []).append(row)
    reports, names, sources = [], [], []
    for members in groups.values():
        reports.append(_merge([json.loads(report_document(store, r)) for r in members]))
        first = members[0]
        names.append(f"{first.name} ({(first.model_id or first.id)[:8]})")
        sources.append({"name": names[-1], "model_id": first.model_id, "report_ids": [r.id for r in members],
                        "job_ids": [r.job_id for r in members if r.job_id]})
    base = None
    if baseline is not None:
        matches = [i for i, s in enumerate(sources)
                   if baseline == s["model_id"] or baseline in s["report_ids"] or baseline in s["job_ids"]]
        if not matches:
            invalid("baseline", "the baseline must be a report, job or model id of this sweep's reports", baseline,
                    where="query")
        base = matches[0]
    extra = {"sweep_id": group.id, "report_ids": [r.id for r in rows], "sources": sources,
             "unfinished_jobs": sum(1 for j in jobs if j.status != "succeeded")}
    return render_views(reports, names, base, attack, eps, title or f"Sweep {group.name} ({group.id[:8]})", format,
                        extra)
