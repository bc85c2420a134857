"""Request and response bodies of the REST API (``XCreate`` in, ``XPublic`` out).

Units: ε and α are given in 1/255 of the [0, 1] input range, like the paper (``eps: 8``
means 8/255); accuracies are percentages.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from robustact.models.config import ARCHES, DEFENCES, MAX_QUERIES, MAX_STEPS, MODES, PRESETS
from robustact.models.evaluate import ATTACK_SPEC_MAX_LENGTH, ATTACK_SPEC_PATTERN, expand_attacks

Defence = Literal[DEFENCES]  # type: ignore[valid-type]
Arch = Literal[ARCHES]  # type: ignore[valid-type]
Mode = Literal[MODES]  # type: ignore[valid-type]
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
Protocol = Literal["xsub", "xview"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Eps255 = Annotated[float, Field(ge=0, le=255, description="L-inf budget in 1/255 units (8 means 8/255)")]

# Upper bound of list offsets, so the database never gets an integer it cannot bind (a
# 40-digit offset was a 500: OverflowError in the SQLite driver).
MAX_OFFSET = 2**31 - 1

# Bounds of a request (issue 8): what one call may ask of the workers and the database. An
# attack's iterations and queries are bounded by the engine (models.config.MAX_STEPS,
# MAX_QUERIES), so the CLI refuses the same.
MAX_ID_LENGTH = 200  # ids and names
MAX_LOCATION_LENGTH = 1024  # a dataset directory or s3:// URL (an S3 key stops at 1024 bytes)
MAX_ATTACKS = 16  # attack strings of one evaluation
MAX_BUDGETS = 16  # ε values of one evaluation
MAX_SUITE = 64  # attack configs of one evaluation: attacks (presets expanded) × modes × ε
MAX_SEED = 2**31 - 1  # int32: every RNG takes it, and so does any database column
MAX_SAMPLES = 10**7  # a class-balanced subset; NTU RGB+D 120 has 114,480 clips
MAX_LAMBDA = 1000.0
MAX_COMPARE = 64  # reports in one comparison (stored and inline together)
MAX_GRID_FIELDS = 16
MAX_GRID_VALUES = 64  # values of one grid field (their product is bounded by MAX_SWEEP_JOBS)
MAX_BASE_FIELDS = 64  # a job body has about 20

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="random seed (int32)")]
AttackSpec = Annotated[str, Field(
    pattern=ATTACK_SPEC_PATTERN, max_length=ATTACK_SPEC_MAX_LENGTH,
    description=f"fgsm, pgdK, cwK, apgd-ceK, apgd-dlrK (K ≤ {MAX_STEPS} iterations), squareK (K ≤ {MAX_QUERIES} "
                "queries), K optional, or autoattack", examples=["pgd20"])]


def _unique(values: list) -> list:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"values must be unique; repeated: {', '.join(repeated)}")
    return values


Unique = AfterValidator(_unique)


def _error_at(model: str, loc: tuple, kind: str, message: str, value: Any) -> ValidationError:
    """A validation error located at ``loc``, for a check that spans several fields (a
    ValueError raised by a model validator would name no field)."""
    return ValidationError.from_exception_data(model, [InitErrorDetails(
        type=PydanticCustomError(kind, message.replace("{", "(").replace("}", ")")), loc=loc, input=value)])


def _first_non_finite(data: Any) -> tuple[tuple, float] | None:
    """Location and value of the first NaN or ±Infinity in a JSON-like value, in document order."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return loc, value
        if isinstance(value, dict):
            stack.extend(((*loc, k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*loc, i), v) for i, v in reversed(list(enumerate(value))))
    return None


class RequestBody(BaseModel):
    """A request body: no NaN or ±Infinity anywhere in it. Python's JSON parser reads the
    NaN / Infinity tokens that strict JSON does not have; they are refused before any field
    is validated, because an error that echoed such a number back could not be written as
    JSON (the 422 would become a 500)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        found = _first_non_finite(data)
        if found is not None:
            loc, value = found
            token = json.dumps(value)
            raise _error_at(cls.__name__, loc, "finite_number", f"Input should be a finite number, not {token}",
                            token)
        return data


class Links(BaseModel):
    model_config = ConfigDict(extra="allow")

    self: str


class ErrorPublic(BaseModel):
    """The body of every error answer."""

    detail: str | list[dict[str, Any]] = Field(description="what went wrong; for a 422, a list of {loc, msg, type} "
                                                           "naming each bad field")


# --------------------------------------------------------------------------- datasets


class DatasetCreate(RequestBody):
    name: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      examples=["ntu60-xsub"])
    format: Literal["ntu60", "synthetic", "imigue"] = Field(
        description="ntu60: the NTU RGB+D 60 release layout; synthetic: a dataset written by "
                    "`robustact data synth` (same layout plus classes.txt); imigue: the iMiGUE-style layout "
                    "(classes.txt, labels.csv, split.json, videos/<id>.mp4, skeleton/<id>/ OpenPose JSON per frame; "
                    "2-D pose, 22 joints, 1 body, X-Sub only), as `robustact data synth --layout imigue` writes it")
    location: str = Field(min_length=1, max_length=MAX_LOCATION_LENGTH,
                          description="a directory path the workers can read, or s3://bucket/prefix",
                          examples=["/data/ntu60", "s3://datasets/ntu60"])
    protocol: Protocol = Field("xsub", description="train/test split used by jobs on this dataset")


class SplitCounts(BaseModel):
    train: int
    test: int


class SkeletonGeometry(BaseModel):
    joints: int
    skel_channels: int = Field(description="coordinates per joint: 3 (x, y, z) or 2 (image x, y)")
    persons: int


class DatasetPublic(BaseModel):
    id: str
    name: str
    format: str
    location: str | None = Field(description="where the files are (shown to admin keys only)")
    owner_id: str | None
    shared: bool = Field(False, description="shared with this key read-only (not its own)")
    protocol: str
    num_classes: int
    class_names: list[str]
    num_samples: int
    splits: dict[str, SplitCounts] = Field(description="sample counts per protocol and split")
    incomplete_samples: int = Field(description="samples with a skeleton but no video or the reverse (skipped)")
    layout: Literal["ntu", "imigue"] = Field(description="the file layout (ntu for formats ntu60 and synthetic)")
    geometry: SkeletonGeometry = Field(description="the skeletons' shape; a model must take the same to be "
                                                   "trained or evaluated on this dataset")
    created_at: dt.datetime
    links: Links


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------- jobs


class AttackRecipe(RequestBody):
    """The inner maximisation of adversarial training (multimodal PGD by default)."""

    name: Literal["pgd", "fgsm", "cw"] = "pgd"
    steps: int = Field(10, ge=1, le=MAX_STEPS)
    eps: Eps255 = 8.0
    alpha: float = Field(2.0, gt=0, le=255, description="step size in 1/255 units")
    random_start: bool = True


class TrainJobCreate(RequestBody):
    kind: Literal["train"]
    dataset_id: Id = Field(description="id or name of the dataset")
    name: str | None = Field(None, max_length=MAX_ID_LENGTH, description="name of the model (default: defence-jobid)")
    defence: Defence = "amr"
    arch: Arch = "fusion"
    num_amr: int | None = Field(None, ge=0, le=3, description="AMR modules; default 3 for amr, else 0")
    lam: float = Field(1.0, ge=0, le=MAX_LAMBDA, description="λ, weight of the AMR loss (eq. 12)")
    preset: Preset = "tiny"
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=1024)
    lr: float = Field(0.01, gt=0, le=10)
    attack: AttackRecipe = AttackRecipe()
    seed: Seed = 0
    protocol: Protocol | None = Field(None, description="default: the dataset's protocol")
    max_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="train on a class-balanced subset of "
                                                                            "this size")
    devices: int = Field(1, ge=1, le=16, description="data-parallel processes on the worker that takes the job "
                         "(DistributedDataParallel: one per GPU on a CUDA worker, gloo processes sharing the cores "
                         "on a CPU one); batch_size is the global batch and must divide by it")


class EvaluateJobCreate(RequestBody):
    """An attack suite (``attacks`` × ``modes`` × ``eps``, at most MAX_SUITE configs) run
    on a model."""

    kind: Literal["evaluate"]
    model_id: Id
    dataset_id: Id | None = Field(None, description="id or name; default: the dataset the model was trained on")
    split: Literal["train", "test"] = "test"
    protocol: Protocol | None = None
    attacks: Annotated[list[AttackSpec], Unique] = Field(
        ["fgsm", "pgd20"], min_length=1, max_length=MAX_ATTACKS, json_schema_extra={"uniqueItems": True},
        description=f"fgsm, pgdK, cwK, apgd-ce[K], apgd-dlr[K], square[K] (K = iterations, at most {MAX_STEPS}; "
                    f"queries for square, at most {MAX_QUERIES}), or autoattack (= apgd-ce, apgd-dlr, square). "
                    f"Attacks (autoattack counting 3) × modes × eps is at most {MAX_SUITE}")
    modes: Annotated[list[Mode], Unique] = Field(list(MODES), min_length=1, max_length=len(MODES),
                                                 json_schema_extra={"uniqueItems": True})
    eps: Annotated[list[Eps255], Unique] = Field([8.0], min_length=1, max_length=MAX_BUDGETS,
                                                 json_schema_extra={"uniqueItems": True})
    alpha: float = Field(2.0, gt=0, le=255, description="PGD/CW step size in 1/255 units")
    random_start: bool = True
    batch_size: int = Field(16, ge=1, le=1024)
    seed: Seed = 0
    max_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="evaluate a class-balanced subset of "
                                                                            "this size")
    restarts: int = Field(1, ge=1, le=100, description="restarts of every randomised attack (the worst per clip is "
                                                        "kept)")
    strategy: Literal["full", "worst-case"] | None = Field(
        None, description="full: every attack on every clean-correct clip (per-attack columns); worst-case: per "
                          "budget and mode, cheapest attack first on the clips still standing (same worst case, "
                          "cheaper). Default: worst-case for autoattack, full otherwise")
    diagnostics: bool = Field(True, description="gradient-masking checks (zero gradients, unbounded attack, ...)")
    shards: int | None = Field(None, ge=1, le=64, description="run the evaluation as this many shard jobs, which "
                               "any worker can take and which take units (an attack on a batch of clips) from a queue until none is left; "
                               "merged into one report (the per-clip results of an unsharded run). About as many as "
                               "the workers you want on it. Default: one per 500 clips, 1 for small sets")

    @model_validator(mode="after")
    def _suite_size(self) -> "EvaluateJobCreate":
        attacks = len(expand_attacks(self.attacks))
        size = attacks * len(self.modes) * len(self.eps)
        if size > MAX_SUITE:
            raise _error_at(type(self).__name__, ("attacks",), "value_error",
                            f"the suite would have {size} attack configs ({attacks} attacks, autoattack counting "
                            f"3, × {len(self.modes)} modes × {len(self.eps)} eps); at most {MAX_SUITE} per "
                            "evaluation", self.attacks)
        return self


class PrepareJobCreate(RequestBody):
    """Decode a dataset once, spread over the workers, into the cache that training and
    evaluation at the ``preset``'s geometry read; the cache goes to the object store, and
    every worker downloads it from there instead of decoding the videos itself."""

    kind: Literal["prepare"]
    dataset_id: Id = Field(description="id or name of the dataset")
    preset: Preset = Field("tiny", description="the geometry (RGB frames and size, skeleton frames) of this "
                                               "preset's models")
    shards: int | None = Field(None, ge=1, le=64, description="run it as this many shard jobs, which take groups "
                               "of samples from a queue until none is left (about as many as the workers you want "
                               "on it). Default: one per 200 samples, at most 64")


JobCreate = Annotated[TrainJobCreate | EvaluateJobCreate | PrepareJobCreate, Field(discriminator="kind")]


class JobInputs(BaseModel):
    """What the job reads. A training job has no input model: the model it produces is in
    ``outputs``."""

    dataset_id: str | None = Field(None, description="the dataset it trains or evaluates on")
    model_id: str | None = Field(None, description="evaluation jobs only: the model evaluated")

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class JobOutputs(BaseModel):
    model_id: str | None = Field(None, description="training jobs: the model it produced (once succeeded)")
    report_id: str | None = Field(None, description="evaluation jobs: the report it wrote (once succeeded)")
    cache: str | None = Field(None, description="prepare jobs: where the prepared cache is in the object store "
                                                "(once succeeded)")


class JobTimings(BaseModel):
    created_at: dt.datetime
    queued_at: dt.datetime | None = Field(description="when it last entered the queue (created, retried or "
                                                       "requeued after its worker was lost)")
    sent_at: dt.datetime | None = Field(description="when its message last reached the broker; null while "
                                                     "queued means it waits to be sent (the broker was "
                                                     "unreachable): it is sent again automatically")
    started_at: dt.datetime | None = Field(description="start of the current (last) attempt")
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    queued_seconds: float | None = Field(description="the wait from queued_at to the start of the current attempt")
    running_seconds: float | None = Field(description="the current (last) attempt's running time")


class ShardPublic(BaseModel):
    index: int
    id: str
    status: JobStatus
    attempts: int
    worker: str | None
    fraction: float = Field(description="share of the evaluation's units this shard has done, 0..1 (shards take "
                            "units from a queue; the evaluation's fraction is the sum)")
    error: str | None


class JobPublic(BaseModel):
    id: str
    kind: str
    status: JobStatus
    inputs: JobInputs
    params: dict[str, Any] = Field(description="the request and the fully resolved configs")
    group_id: str | None = Field(None, description="the sweep that launched it, if any")
    progress: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int = Field(description="attempts so far (every run counts, also those whose worker was lost)")
    attempts_left: int = Field(description="runs left before a lost worker fails the job instead of requeueing "
                                           "it; a retry gives the full budget again")
    worker: str | None
    timings: JobTimings
    outputs: JobOutputs
    shards: list[ShardPublic] | None = Field(None, description="a sharded evaluation's shard jobs")
    links: Links


class JobList(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------- sweeps

SweepStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "partial"]
SWEEP_PRESETS = ("table4", "table5")


class SweepCreate(RequestBody):
    """One request for a set of jobs: ``base`` (a job body without ``kind``) with every
    combination of the ``grid`` values (and of the preset's rows) laid over it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train", "evaluate"]
    name: str | None = Field(None, max_length=MAX_ID_LENGTH,
                             description="name of the sweep (default: preset or kind-grid)")
    preset: Literal[SWEEP_PRESETS] | None = Field(  # type: ignore[valid-type]
        None, description="table4: at-rs with 0 AMRs, amr with 1, 2, 3 AMRs (the paper's Table 4), and "
                          "amr-frozen with 3 (W fixed: the reweighting's share); "
                          "table5: amr, 1 AMR, λ ∈ {0.1, 0.5, 1, 2, 5} (Table 5). Train sweeps only; "
                          "crossed with ``grid`` when both are given")
    base: dict[str, Any] = Field(max_length=MAX_BASE_FIELDS,
                                 description="the fields shared by every job: a train or evaluate job body "
                                             "(``kind`` may be left out)")
    grid: dict[str, Annotated[list[Any], Field(max_length=MAX_GRID_VALUES)]] = Field(
        {}, max_length=MAX_GRID_FIELDS, description="job field → values; the sweep is their cartesian product, e.g. "
                                                    "{\"lam\": [0.5, 1], \"seed\": [0, 1]} or "
                                                    "{\"eps\": [[2], [4], [8]]}")


class SweepCounts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class SweepJob(BaseModel):
    id: str
    index: int = Field(description="position in the expansion of the grid")
    varied: dict[str, Any] = Field(description="the values of this job's combination")
    status: JobStatus
    model_id: str | None = Field(description="train: the model it produced; evaluate: the evaluated model")
    report_id: str | None
    error: str | None
    links: Links


class SweepPublic(BaseModel):
    id: str
    name: str
    kind: str
    status: SweepStatus = Field(description="queued, running, succeeded, failed, cancelled, or partial (all "
                                            "finished, some succeeded and some did not)")
    counts: SweepCounts
    total: int
    preset: str | None
    grid: dict[str, Any] = Field(description="the varied fields and their values (preset rows included)")
    base: dict[str, Any]
    created_at: dt.datetime
    jobs: list[SweepJob] | None = Field(description="the jobs in grid order (left out of lists)")
    links: Links


class SweepList(BaseModel):
    items: list[SweepPublic]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------- models


class ModelPublic(BaseModel):
    id: str
    name: str
    job_id: str | None
    dataset_id: str | None
    created_at: dt.datetime
    owner_id: str | None
    shared: bool = Field(False, description="shared with this key read-only (not its own)")
    preset: str | None
    arch: str
    defence: str | None
    num_amr: int
    num_classes: int
    class_names: list[str]
    config: dict[str, Any] = Field(description="the checkpoint's config.json")
    files: list[str]
    report_ids: list[str]
    links: Links


class ModelList(BaseModel):
    items: list[ModelPublic]
    total: int
    limit: int
    offset: int


class ClassPrediction(BaseModel):
    index: int
    name: str
    probability: float


class ClassifyTimings(BaseModel):
    decode: float
    model_load: float
    inference: float
    total: float


class ClassifyResult(BaseModel):
    model_id: str
    top: list[ClassPrediction]
    timings_ms: ClassifyTimings
    inputs: dict[str, Any] = Field(description="what was decoded: frames, sizes, bodies")


# --------------------------------------------------------------------------- reports


class ReportPublic(BaseModel):
    id: str
    name: str
    job_id: str | None
    model_id: str | None
    dataset_id: str | None
    created_at: dt.datetime
    owner_id: str | None
    links: Links


class ReportList(BaseModel):
    items: list[ReportPublic]
    total: int
    limit: int
    offset: int


class CompareRequest(RequestBody):
    """At most MAX_COMPARE reports, stored and inline together."""

    report_ids: list[Id] = Field([], max_length=MAX_COMPARE, description="ids of stored reports")
    reports: list[dict[str, Any]] = Field([], max_length=MAX_COMPARE,
                                          description="report documents (robustact.report/v1), e.g. from the CLI")
    baseline: str | None = Field(None, max_length=MAX_ID_LENGTH,
                                 description="id of the baseline report, or the model name of an inline one; "
                                             "default: the first")
    attack: str = Field("PGD20", min_length=1, max_length=64,
                        description="attack label of the table: PGD20, FGSM, CW30, ...")
    eps: float | None = Field(None, ge=0, le=255, description="budget in 1/255 units, when a report has several")

    @model_validator(mode="after")
    def _total(self) -> "CompareRequest":
        total = len(self.report_ids) + len(self.reports)
        if total > MAX_COMPARE:
            raise _error_at(type(self).__name__, ("reports",), "value_error",
                            f"{total} reports ({len(self.report_ids)} report_ids + {len(self.reports)} reports); "
                            f"at most {MAX_COMPARE} in one comparison", len(self.reports))
        return self
