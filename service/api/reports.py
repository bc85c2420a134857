"""/v1/reports: robustness reports (``robustact.report/v2`` JSON, stored as written by the
worker) and their per-clip records, Table-2 comparisons with RI against a chosen baseline (``models.report``) and the
paper's figures and tables as JSON or one HTML page (``models.views``)."""

from __future__ import annotations

import io
import json
import logging
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, select

from robustact.models.report import WORST_CASE, ReportError, compare, format_comparison, report_name, validate_report
from robustact.models.views import attack_labels, build_views, render_html
from robustact.service.api.deps import SessionDep, StoreDep, invalid
from robustact.service.auth import Caller, CallerDep, get_visible, require_owner, scoped
from robustact.service.db import Report
from robustact.service.schemas import MAX_OFFSET, CompareRequest, Links, ReportList, ReportPublic
from robustact.service.store import ObjectNotFound, Store, clips_key

router = APIRouter(prefix="/v1/reports", tags=["reports"])
log = logging.getLogger("robustact.api")


def report_public(row: Report) -> ReportPublic:
    links = {"self": f"/v1/reports/{row.id}"}
    if row.model_id:
        links["model"] = f"/v1/models/{row.model_id}"
    if row.job_id:
        links["job"] = f"/v1/jobs/{row.job_id}"
    return ReportPublic(id=row.id, name=row.name, job_id=row.job_id, model_id=row.model_id,
                        dataset_id=row.dataset_id, created_at=row.created_at, owner_id=row.owner_id,
                        links=Links(**links))


def report_document(store: Store, row: Report) -> bytes:
    try:
        return store.get_bytes(row.artifact_key)
    except ObjectNotFound:
        raise HTTPException(status_code=503, detail=f"report {row.id!r}: its document is missing from the store")


@router.get("", response_model=ReportList)
def list_reports(caller: CallerDep, session: SessionDep, model_id: str | None = Query(None, max_length=64),
                 dataset_id: str | None = Query(None, max_length=64), limit: int = Query(100, ge=1, le=500),
                 offset: int = Query(0, ge=0, le=MAX_OFFSET, description="rows to skip")):
    """This key's reports (admin: all), oldest first."""
    query = scoped(select(Report), Report, caller)
    if model_id is not None:
        query = query.where(Report.model_id == model_id)
    if dataset_id is not None:
        query = query.where(Report.dataset_id == dataset_id)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Report.created_at, Report.id).limit(limit).offset(offset)).all()
    return ReportList(items=[report_public(r) for r in rows], total=total, limit=limit, offset=offset)


MAX_COMPARED = 64


def _comparison(session, store: Store, caller: Caller, ids: list[str], documents: list[dict], baseline: str | None,
                attack: str, eps: float | None, where: str) -> dict:
    """Table 2 over stored reports (by id) followed by inline documents (CLI reports)."""
    if len(ids) + len(documents) > MAX_COMPARED:
        invalid("ids" if where == "query" else "report_ids", f"at most {MAX_COMPARED} reports per comparison, "
                f"got {len(ids) + len(documents)}", where=where)
    rows = [get_visible(session, Report, i, caller, "report") for i in ids]
    reports = [json.loads(report_document(store, r)) for r in rows]
    names = [f"{r.name} ({r.id[:8]})" for r in rows]
    for i, document in enumerate(documents):
        try:
            validate_report(document, source=f"reports[{i}]")
        except ReportError as e:
            invalid("reports", str(e), where=where)
        reports.append(document)
        names.append(report_name(document))
    if not reports:
        invalid("ids" if where == "query" else "report_ids", "name at least one report", where=where)
    candidates = ids + names[len(ids):]
    base = baseline if baseline is not None else candidates[0]
    if base not in candidates:
        invalid("baseline", f"the baseline {base!r} must be the id (or, for an inline report, the model name) of "
                            "one of the compared reports", base, where=where)
    try:
        table = compare(reports, baseline=candidates.index(base), attack=attack, eps=eps, names=names)
    except ReportError as e:
        if "budget" in str(e):  # several budgets and none named, or different ones: eps decides
            invalid("eps", str(e), eps, where=where)
        invalid("attack", str(e), attack, where=where)
    table["report_ids"] = ids
    return table


@router.get("/compare", responses={200: {"content": {"text/plain": {}},
                                         "description": "the Table-2 comparison as JSON, or as text (format=text)"}})
def compare_reports(caller: CallerDep, session: SessionDep, store: StoreDep,
                    ids: list[str] = Query(..., description="report ids (repeat ids=… or comma-separate)"),
                    baseline: str | None = Query(None, description="id of the baseline report (default: the first)"),
                    attack: str = Query("PGD20", description="attack label of the table, e.g. PGD20, FGSM, CW30, "
                                                             "APGD-CE100, or worst-case"),
                    eps: float | None = Query(None, ge=0, le=255, description="budget in 1/255 units, if several"),
                    format: Literal["json", "text"] = "json"):
    """Table-2 layout: ✓RS, ✗R, ✗S, ✗RS, Avg and RI against ``baseline`` for each report."""
    wanted = [i for part in ids for i in part.split(",") if i]
    table = _comparison(session, store, caller, wanted, [], baseline, attack, eps, where="query")
    if format == "text":
        return Response(format_comparison(table) + "\n", media_type="text/plain; charset=utf-8")
    return table


@router.post("/compare")
def compare_reports_body(body: CompareRequest, caller: CallerDep, session: SessionDep, store: StoreDep):
    """The same table from a JSON body; ``reports`` may add report documents written by
    the CLI (``robustact evaluate``) to the stored ones."""
    return _comparison(session, store, caller, body.report_ids, body.reports, body.baseline, body.attack, body.eps,
                       where="body")


# The page is self-contained: no scripts, nothing fetched (also said by a <meta> in the page).
HTML_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}


def _html(page: str) -> HTMLResponse:
    return HTMLResponse(page, headers=HTML_HEADERS)


@router.get("/view", responses={200: {"content": {"text/html": {}},
                                      "description": "robustact.views/v1 JSON, or the HTML page"}})
def report_views(caller: CallerDep, session: SessionDep, store: StoreDep,
                 ids: list[str] = Query(..., description="report ids (repeat ids=… or comma-separate)"),
                 baseline: str | None = Query(None, description="id of the Table-2 baseline report (default: the "
                                                                "undefended model, else the first)"),
                 attack: str | None = Query(None, description="attack label of Table 2 (default: PGD20 when "
                                                              "present, else the first label)"),
                 eps: float | None = Query(None, ge=0, le=255, description="Table-2 budget in 1/255 units, if several"),
                 title: str = Query("robustact report", max_length=200),
                 format: Literal["json", "html"] = "json"):
    """Figure 2 (accuracy vs ε), Table 1 (modal robustness with the unimodal baselines),
    Table 2 (Avg and RI against ``baseline``), Table 3 and Figure 4 (AMR weights) of the
    stored reports, as a ``robustact.views/v1`` document or a self-contained HTML page."""
    wanted = [i for part in ids for i in part.split(",") if i]
    if not wanted:
        invalid("ids", "name at least one report", where="query")
    if len(wanted) > MAX_COMPARED:
        invalid("ids", f"at most {MAX_COMPARED} reports per page, got {len(wanted)}", where="query")
    rows = [get_visible(session, Report, i, caller, "report") for i in wanted]
    reports = [json.loads(report_document(store, r)) for r in rows]
    names = [f"{r.name} ({r.id[:8]})" for r in rows]
    base = None
    if baseline is not None:
        if baseline not in wanted:
            invalid("baseline", f"the baseline {baseline!r} must be the id of one of the reports", baseline,
                    where="query")
        base = wanted.index(baseline)
    return render_views(reports, names, base, attack, eps, title, format, {"report_ids": wanted})


def render_views(reports: list[dict], names: list[str], baseline: int | None, attack: str | None,
                 eps: float | None, title: str, format: str, extra: dict):
    """The ``robustact.views/v1`` document of ``reports`` (plus ``extra``), or its HTML page;
    an attack label no report has is a 422 on the ``attack`` query parameter."""
    if attack is not None and attack.lower() != WORST_CASE and \
            attack.lower() not in {a.lower() for a in attack_labels(reports)}:
        invalid("attack", f"no report has {attack} results (labels: {', '.join(attack_labels(reports)) or 'none'})",
                attack, where="query")
    if format == "html":
        return _html(render_html(reports, baseline=baseline, attack=attack, eps=eps, title=title, names=names))
    views = build_views(reports, baseline=baseline, attack=attack, eps=eps, names=names)
    views.update(extra)
    return views


@router.get("/{report_id}", responses={200: {"description": "the robustact.report/v2 document"}})
def get_report(report_id: str, caller: CallerDep, session: SessionDep, store: StoreDep):
    """The report document itself, exactly as the worker (or the CLI) wrote it."""
    row = get_visible(session, Report, report_id, caller, "report")
    return Response(report_document(store, row), media_type="application/json")


@router.get("/{report_id}/meta", response_model=ReportPublic)
def get_report_meta(report_id: str, caller: CallerDep, session: SessionDep):
    return report_public(get_visible(session, Report, report_id, caller, "report"))


@router.delete("/{report_id}", status_code=204)
def delete_report(report_id: str, caller: CallerDep, session: SessionDep, store: StoreDep):
    """Delete a report: its row first (so nothing points at a half-deleted document), then
    its document and per-clip records in the store. Owner or admin."""
    row = get_visible(session, Report, report_id, caller, "report")
    require_owner(row, caller, "report", "delete")
    key = row.artifact_key
    session.delete(row)
    session.commit()
    for stored in (key, clips_key(key)):
        try:
            store.delete(stored)
        except Exception:  # the row is gone; a stray object is only wasted space
            log.exception("report %s deleted, but not its object %s", report_id, stored)
    return Response(status_code=204)


@router.get("/{report_id}/html", response_class=HTMLResponse)
def get_report_html(report_id: str, caller: CallerDep, session: SessionDep, store: StoreDep):
    """One report's figures and tables as a self-contained HTML page (no scripts, inline SVG)."""
    row = get_visible(session, Report, report_id, caller, "report")
    report = json.loads(report_document(store, row))
    return _html(render_html([report], title=f"Report {row.name} ({row.id[:8]})", names=[row.name]))


@router.get("/{report_id}/clips", responses={200: {"content": {"application/octet-stream": {}, "application/json": {}},
                                                   "description": "the per-clip records (robustact.clips/v1)"}})
def get_report_clips(report_id: str, caller: CallerDep, session: SessionDep, store: StoreDep,
                     format: Literal["npz", "json"] = Query("npz", description="npz (numpy, no pickle) or json")):
    """The evaluation's per-clip table: label, clean prediction and, per suite entry,
    whether it broke the clip and at which iterate (docs/REPORT.md). Every accuracy of the
    report is an aggregate of it."""
    from robustact.models.evaluate import ClipRecords

    row = get_visible(session, Report, report_id, caller, "report")
    try:
        data = store.get_bytes(clips_key(row.artifact_key))
    except ObjectNotFound:
        raise HTTPException(status_code=404, detail=f"report {row.id!r} has no per-clip records (it was written "
                                                    "before they existed, schema robustact.report/v1)")
    if format == "json":
        return ClipRecords.load(io.BytesIO(data)).to_json()
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{row.id}.clips.npz"'})
