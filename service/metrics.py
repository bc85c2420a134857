"""Prometheus metrics at ``GET /metrics`` (open, like ``/healthz`` and ``/readyz``).

Each app has its own ``CollectorRegistry`` (``app.state.metrics.registry``), not the
process-wide default one: tests build many apps in one process. Three sources:

* **HTTP**, by prometheus-fastapi-instrumentator, outermost middleware so that it counts
  the 401s, 413s and admission 503s too: ``http_requests_total{method,status,handler}``,
  ``http_request_duration_seconds{method,handler}``, ``http_request_duration_highr_seconds``
  and the request/response size summaries. ``handler`` is the route template
  (``/v1/jobs/{job_id}``; ``none`` for a path no route matches), so ids cannot multiply the
  series; ``/metrics`` itself is not counted.
* **Classify**, observed in this process: ``robustact_classify_seconds{outcome}`` (the
  whole request, as the client sees it), ``robustact_classify_decode_seconds`` and
  ``robustact_classify_inference_seconds`` (observed by the route handler), and the
  admission state.
* **The service's state**, read from the database and the broker at each scrape
  (:class:`StateCollector`): jobs by kind and status, queue depth, unsent jobs, job
  durations, workers.

Workers run no HTTP endpoint: they report through the database (their ``workers`` row,
refreshed every heartbeat, and their jobs' rows) and the API exports what is there. So
every API replica exports the same state figures: aggregate them with ``max``, not ``sum``.

A backend that is down or slow does not fail or stall a scrape: each read runs in a thread
waited for at most ``READ_TIMEOUT_S``; a read that fails or is late sets
``robustact_backend_up{backend}`` to 0 and its families are left out of that scrape.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any, Callable, Iterable

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics
from sqlalchemy import func, select

from robustact.service.db import FINISHED, JOB_STATUSES, Job, Worker, utcnow
from robustact.service.reaper import count_alive
from robustact.service.settings import Settings
from robustact.worker.celery_app import TASK_FOR_KIND, queue_depth

log = logging.getLogger("robustact.metrics")

READ_TIMEOUT_S = 2.0
CLASSIFY_ROUTE = "/v1/models/{model_id}/classify"
CLASSIFY_OUTCOMES = ("ok", "client_error", "busy", "error")
HTTP_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30)
CLASSIFY_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Jobs take seconds (tiny presets) to days (paper presets); they wait seconds to hours.
JOB_SECONDS_BUCKETS = (1, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
                       3 * 86400, 7 * 86400)
QUEUED_SECONDS_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400)


def classify_outcome(status: int) -> str:
    """ok (2xx), client_error (4xx), busy (503: at capacity, or a decoder or the model is
    unavailable; worth a retry) or error (any other 5xx)."""
    if status < 400:
        return "ok"
    if status == 503:
        return "busy"
    return "client_error" if status < 500 else "error"


class Metrics:
    """The app's registry and what this process observes itself (``app.state.metrics``)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.classify_seconds = Histogram(
            "robustact_classify_seconds", "Classify requests from arrival to answer, by outcome: ok (2xx), "
            "client_error (4xx), busy (503), error (other 5xx)", ["outcome"], buckets=CLASSIFY_SECONDS_BUCKETS,
            registry=registry)
        for outcome in CLASSIFY_OUTCOMES:  # every series from the start, so rates are defined
            self.classify_seconds.labels(outcome)
        self.classify_decode_seconds = Histogram(
            "robustact_classify_decode_seconds", "Decoding of a classify request's uploads in the decoder "
            "processes (answered requests)", buckets=CLASSIFY_SECONDS_BUCKETS, registry=registry)
        self.classify_inference_seconds = Histogram(
            "robustact_classify_inference_seconds", "Forward pass of a classify request (answered requests)",
            buckets=CLASSIFY_SECONDS_BUCKETS, registry=registry)

    def observe_classify_request(self, info: http_metrics.Info) -> None:
        """An instrumentator instrumentation: every answered request passes here."""
        if info.modified_handler == CLASSIFY_ROUTE and info.method == "POST":
            self.classify_seconds.labels(classify_outcome(int(info.modified_status))).observe(info.modified_duration)

    def observe_classify_result(self, result: dict[str, Any]) -> None:
        """The timings of ``service.classify.classify``'s answer."""
        self.classify_decode_seconds.observe(result["decode_ms"] / 1e3)
        self.classify_inference_seconds.observe(result["inference_ms"] / 1e3)


def install_metrics(app: FastAPI, settings: Settings) -> Metrics:
    """``GET /metrics`` and the HTTP middleware (call before the app starts; the middleware
    added last is the outermost)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    registry.register(StateCollector(app, settings))
    instrumentator = Instrumentator(should_group_status_codes=False, excluded_handlers=["^/metrics$"],
                                    registry=registry)
    instrumentator.add(http_metrics.default(latency_lowr_buckets=HTTP_SECONDS_BUCKETS, registry=registry),
                       metrics.observe_classify_request)
    instrumentator.instrument(app).expose(app, include_in_schema=False)
    app.state.metrics = metrics
    return metrics


class BoundedRead:
    """``read()`` in a daemon thread, waited for until a deadline. One at a time: while a
    read from an earlier scrape still hangs, a scrape waits for that one instead of starting
    another, so a dead backend costs one thread, not one per scrape."""

    def __init__(self, name: str, read: Callable[[], list[Metric]]):
        self.name, self.read = name, read
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}
        self._failing = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["value"] = self.read()
                except Exception as e:  # reported as the backend being down
                    outcome["error"] = e

            self._outcome = outcome
            self._thread = threading.Thread(target=run, name=f"metrics-{self.name}", daemon=True)
            self._thread.start()

    def result(self, deadline: float) -> list[Metric] | None:
        """The read's families, or None when it failed or is not done by ``deadline``."""
        with self._lock:
            thread, outcome = self._thread, self._outcome
        if thread is None:
            return None
        thread.join(max(0.0, deadline - time.monotonic()))
        if "value" in outcome:
            if self._failing:
                log.info("metrics: the %s answers again", self.name)
            self._failing = False
            return outcome["value"]
        if not self._failing:  # once per outage, not at every scrape
            error = outcome.get("error")
            log.warning("metrics: cannot read the %s (%s)", self.name, f"{type(error).__name__}: {error}"
                        if error is not None else f"no answer within {READ_TIMEOUT_S:g} s")
        self._failing = True
        return None


def _histogram(name: str, documentation: str, labelnames: list[str], samples: dict[tuple[str, ...], list[float]],
               buckets: Iterable[float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labelnames)
    for labels, values in sorted(samples.items()):
        values = sorted(values)
        counts = [(floatToGoString(b), bisect.bisect_right(values, b)) for b in buckets]
        family.add_metric(list(labels), counts + [("+Inf", len(values))], sum(values))
    return family


class StateCollector:
    """The service's state at scrape time, from the database (``app.state.sessions``) and the
    broker (``app.state.celery``), each read bounded by ``READ_TIMEOUT_S``.

    The job histograms are computed from the rows at each scrape, so they are snapshots: a
    failed job retried by its user leaves them (Prometheus sees a counter reset)."""

    def __init__(self, app: FastAPI, settings: Settings):
        self.app, self.settings = app, settings
        self.reads = {"database": BoundedRead("database", self.read_database),
                      "broker": BoundedRead("broker", self.read_broker)}

    def collect(self) -> Iterable[Metric]:
        for read in self.reads.values():
            read.start()
        deadline = time.monotonic() + READ_TIMEOUT_S
        up = GaugeMetricFamily("robustact_backend_up", "1 when the backend answered this scrape in time, else 0 "
                                                       "(and its metrics are left out)", labels=["backend"])
        families: list[Metric] = []
        for name, read in self.reads.items():
            result = read.result(deadline)
            up.add_metric([name], 0.0 if result is None else 1.0)
            families += result or []
        yield up
        yield from families
        admission = self.app.state.admission
        yield GaugeMetricFamily("robustact_classify_inflight", "Classify requests admitted and not answered yet "
                                                               "(computing or waiting for a slot)",
                                value=admission.inflight)
        yield CounterMetricFamily("robustact_classify_rejected", "Classify requests refused at once (503) because "
                                                                 "every slot and queue place was taken",
                                  value=admission.rejected)

    def read_database(self) -> list[Metric]:
        kinds = [*TASK_FOR_KIND, "prepare"]  # a prepare job is never sent itself, its shards are
        with self.app.state.sessions() as session:
            now = utcnow()
            counts = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)).all()
            unsent = session.scalar(select(func.count()).select_from(Job)
                                    .where(Job.status == "queued", Job.sent_at.is_(None)))
            finished = session.execute(select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
                Job.status.in_(FINISHED), Job.started_at.is_not(None), Job.finished_at.is_not(None))).all()
            started = session.execute(select(Job.kind, Job.queued_at, Job.started_at).where(
                Job.started_at.is_not(None), Job.queued_at.is_not(None))).all()
            workers = session.execute(select(Worker.name, Worker.seen_at).order_by(Worker.name)).all()
            alive = count_alive(session, self.settings.heartbeat_timeout_s)

        jobs = GaugeMetricFamily("robustact_jobs", "Jobs by kind and status", labels=["kind", "status"])
        table = {(kind, status): 0 for kind in kinds for status in JOB_STATUSES}
        table.update({(kind, status): n for kind, status, n in counts})
        for labels, n in sorted(table.items()):
            jobs.add_metric(list(labels), n)

        durations: dict[tuple[str, ...], list[float]] = {(kind, status): [] for kind in kinds for status in FINISHED}
        for kind, status, started_at, finished_at in finished:
            durations.setdefault((kind, status), []).append(max(0.0, (finished_at - started_at).total_seconds()))
        # From its last queueing to its start; a job requeued and not started again has
        # started_at < queued_at and is left out.
        waits: dict[tuple[str, ...], list[float]] = {(kind,): [] for kind in kinds}
        for kind, queued_at, started_at in started:
            if started_at >= queued_at:
                waits.setdefault((kind,), []).append((started_at - queued_at).total_seconds())

        last_seen = GaugeMetricFamily("robustact_worker_last_seen_seconds", "Seconds since each worker's last "
                                      "heartbeat (rows of departed workers are pruned after a while)",
                                      labels=["worker"])
        for name, seen_at in workers:
            last_seen.add_metric([name], max(0.0, (now - seen_at).total_seconds()))
        return [
            jobs,
            GaugeMetricFamily("robustact_jobs_unsent", "Queued jobs whose message was not handed to the broker yet "
                                                       "(the outbox; the reaper sends them)", value=unsent),
            _histogram("robustact_job_duration_seconds", "Run time of finished jobs (start of the last attempt "
                       "to the end)", ["kind", "status"], durations, JOB_SECONDS_BUCKETS),
            _histogram("robustact_job_queued_seconds", "Wait of started jobs from their last queueing to their "
                       "start", ["kind"], waits, QUEUED_SECONDS_BUCKETS),
            GaugeMetricFamily("robustact_workers_alive", "Workers whose heartbeat is within heartbeat_timeout_s",
                              value=alive),
            last_seen,
        ]

    def read_broker(self) -> list[Metric]:
        depth = queue_depth(self.app.state.celery, timeout_s=READ_TIMEOUT_S)
        return [GaugeMetricFamily("robustact_queue_messages", "Messages waiting in the job queue of the broker "
                                                              "(not those workers hold)", value=depth)]
