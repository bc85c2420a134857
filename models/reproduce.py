"""``robustact reproduce``: every model, report, table and figure of the paper, on a
synthetic dataset at the tiny preset, in one resumable run.

A ``ReproducePlan`` fixes the sizes (synthetic set, epochs, evaluation clips, attack
steps); ``run_plan(plan, out)`` then works through a list of stages:

1. ``data``      — synthesise an NTU-layout set (``models.data.synth``) and decode it into a
                   tiny-preset cache (``models.data.cache.prepare``);
2. ``train``     — 16 models: None, AT-R, AT-S, AT-RS, MinSim, ExFMem, MinSim+ExFMem and
                   AMR (3 AMRs) of Table 2; the unimodal RGB-only and skeleton-only models
                   of Table 1; 1 and 2 AMRs for Table 4 (0 AMRs is AT-RS, 3 is AMR); λ ∈
                   {0.1, 0.5, 2, 5} with 1 AMR for Table 5 (λ = 1 is Table 4's 1-AMR model);
3. ``evaluate``  — every model with PGD20 and CW30 in the modes R, S, RS at ε = 8/255;
                   None also with FGSM/PGD20/CW30 at ε ∈ {2, 4, 6, 8}/255 (Figure 2) and
                   the unimodal models also at 6/255 (Table 1, like None);
4. ``autoattack`` — every fusion model with AutoAttack (APGD-CE → APGD-DLR → Square5000,
                   a worst-case cascade) in RS at ε = 8/255, on the same clips;
5. ``tables``    — Tables 1–5 (markdown + JSON, the paper's numbers alongside), the
                   AutoAttack table (✗RS clip by clip under the suite and AutoAttack),
                   Figures 2 and 4 (SVG, drawn by ``models.views``) and ``index.html``.

Output folder::

    OUT/plan.json                    the plan (a rerun with another plan is refused)
    OUT/data/raw/, OUT/data/cache/   synthetic set and its cache
    OUT/runs/<key>/model/            checkpoints (runs/<key>/last/ while training)
    OUT/reports/<key>.json           robustact.report/v2 reports (+ <key>.clips.npz per-clip records)
    OUT/reports/autoattack/<key>.json  the AutoAttack reports (+ .clips.npz)
    OUT/autoattack.md|json           ✗RS under PGD/CW, AutoAttack and both, per fusion model
    OUT/diagnostics.md|json          worst case and gradient-masking diagnostics of every model
    OUT/table{1..5}.md|json, OUT/table2-cw.md|json
    OUT/figure2-<attack>.svg, OUT/figure4-amr<i>.svg, OUT/index.html, OUT/views.json

Resumable: a stage whose output exists is skipped (a finished checkpoint, a report, the
cache), and an interrupted training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import MODES, AttackConfig, TrainConfig, preset_config
from .data.ntu import XSUB_TRAIN_SUBJECTS
from .report import average, compare, relative_improvement

PLAN_SCHEMA = "robustact.reproduce-plan/v1"
TABLE_SCHEMA = "robustact.table/v1"
PRESET = "tiny"


@dataclass(frozen=True)
class ReproducePlan:
    """Sizes of a reproduction run. ``SIZES`` holds the named plans."""

    size: str = "default"
    # Synthetic set: one clip per subject × camera × replication × class. Subjects 1, 2, 4,
    # 5, 8 are X-Sub training subjects. ``layout`` "ntu" writes it with
    # ``models.data.synth.synthesize`` (3-D, 25 joints, 2 bodies); "imigue" with
    # ``models.data.synth_imigue.synthesize_imigue`` (2-D OpenPose, 22 joints, 1 body), as
    # cameras × replications sessions per subject, so both layouts have as many clips.
    # ``objects``: each motion is that many classes, told apart only by what the hand holds
    # (only the video shows it), so that neither modality alone reaches 100 %.
    layout: str = "ntu"
    objects: int = 2
    # Background contrast (``synth``): the full clutter let the RGB branch memorise its 180
    # training clips (98 % training, 31 % test accuracy alone); a flat wall does not.
    clutter: float = 0.0
    classes: int = 6
    subjects: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    cameras: tuple[int, ...] = (1, 2, 3)
    replications: tuple[int, ...] = (1, 2)
    frames: int = 48
    # Training: clean objectives (None, MinSim, ExFMem, unimodal) are cheap and get
    # ``clean_epochs``; adversarial ones (AT-*, every AMR model) ``adv_epochs``.
    clean_epochs: int = 80
    adv_epochs: int = 30
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 0.001
    train_attack_steps: int = 10
    # Evaluation: at most ``eval_limit`` X-Sub test clips (balanced over classes).
    eval_limit: int | None = 72
    eval_batch_size: int = 16
    pgd_steps: int = 20
    cw_steps: int = 30
    # Then AutoAttack on every fusion model, in RS at ``eps``, as a worst-case cascade on the
    # same clips (``autoattack`` = APGD-CE → APGD-DLR → Square5000); () leaves it out.
    autoattack: tuple[str, ...] = ("autoattack",)
    eps: float = 8.0
    table1_eps: float = 6.0
    curve_eps: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)
    num_amr: int = 3
    amr_counts: tuple[int, ...] = (0, 1, 2, 3)
    lams: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0)
    lam_num_amr: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.classes < 2:
            raise ValueError("classes must be at least 2")
        if self.layout not in ("ntu", "imigue"):
            raise ValueError(f"layout must be ntu or imigue, got {self.layout!r}")
        if not any(s in XSUB_TRAIN_SUBJECTS for s in self.subjects) or all(s in XSUB_TRAIN_SUBJECTS for s in self.subjects):
            raise ValueError("subjects must include X-Sub training and test subjects")
        if min(self.clean_epochs, self.adv_epochs, self.train_attack_steps, self.pgd_steps, self.cw_steps) < 1:
            raise ValueError("epochs and attack steps must be at least 1")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError("eval_limit must be at least 1")
        if 0 not in self.amr_counts or self.num_amr not in self.amr_counts or 1.0 not in self.lams:
            raise ValueError("amr_counts must hold 0 and num_amr, lams must hold 1")
        from .evaluate import AUTOATTACK, expand_attacks, parse_attack_spec

        for spec in expand_attacks(self.autoattack):
            name = parse_attack_spec(spec)[0]
            if name not in AUTOATTACK:
                raise ValueError(f"autoattack holds AutoAttack's attacks (apgd-ce, apgd-dlr, square), got {spec!r}")
            if name == "apgd-dlr" and self.classes < 3:
                raise ValueError("apgd-dlr (in autoattack) needs at least 3 classes")

    # -- derived sizes ----------------------------------------------------------------------

    @property
    def num_clips(self) -> int:
        return len(self.subjects) * len(self.cameras) * len(self.replications) * self.classes

    @property
    def train_clips(self) -> int:
        return sum(s in XSUB_TRAIN_SUBJECTS for s in self.subjects) * len(self.cameras) * len(self.replications) * self.classes

    @property
    def test_clips(self) -> int:
        return self.num_clips - self.train_clips

    @property
    def eval_clips(self) -> int:
        return self.test_clips if self.eval_limit is None else min(self.eval_limit, self.test_clips)

    @property
    def pgd(self) -> str:
        return f"pgd{self.pgd_steps}"

    @property
    def cw(self) -> str:
        return f"cw{self.cw_steps}"

    def with_epochs(self, epochs: int) -> "ReproducePlan":
        """Every model trained for ``epochs`` epochs (the CLI's ``--epochs``)."""
        return dataclasses.replace(self, clean_epochs=epochs, adv_epochs=epochs)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": PLAN_SCHEMA, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in dataclasses.asdict(self).items()}}

    def models(self) -> list["ModelSpec"]:
        return model_specs(self)

    def stages(self) -> list["Stage"]:
        return build_stages(self)

    def estimate(self) -> dict[str, float]:
        """Estimated seconds on 2 CPU cores, per stage kind and in total."""
        out: dict[str, float] = {"data": 0.0, "train": 0.0, "evaluate": 0.0, "autoattack": 0.0, "tables": 0.0}
        for stage in self.stages():
            out[stage.kind] += stage.estimate
        out["total"] = sum(out.values())
        return out

    def describe(self) -> str:
        est = self.estimate()
        models = self.models()
        adv = sum(m.adversarial for m in models)
        return (f"plan {self.size}: {self.num_clips} synthetic {self.layout}-layout clips of {self.classes} classes "
                f"({self.train_clips} X-Sub train, {self.test_clips} test, {self.eval_clips} evaluated); "
                f"{len(models)} models ({len(models) - adv} clean × {self.clean_epochs} epochs, "
                f"{adv} adversarial × {self.adv_epochs} epochs, PGD-{self.train_attack_steps}); "
                f"attacks {self.pgd.upper()}, {self.cw.upper()} at ε={_fmt(self.eps)}/255"
                + (f", then AutoAttack ({' → '.join(a.label for a in _autoattack_suite(self))}) in RS on the "
                   "fusion models" if self.autoattack else "") + "\n"
                f"estimated time on 2 CPU cores: {_clock(est['total'])} (data {_clock(est['data'])}, "
                f"training {_clock(est['train'])}, evaluation {_clock(est['evaluate'])}"
                + (f", AutoAttack {_clock(est['autoattack'])}" if self.autoattack else "") + ")")


SIZES: dict[str, ReproducePlan] = {
    # About an hour on 2 CPU cores (see COSTS); the README's quickstart set (288 clips).
    "default": ReproducePlan(),
    # For tests: 24 clips of 3 classes, one epoch each, 3 evaluated clips, short attacks.
    "small": ReproducePlan(size="small", classes=4, subjects=(1, 3), cameras=(1, 2), replications=(1, 2),
                           frames=16, clean_epochs=1, adv_epochs=1, batch_size=8, train_attack_steps=1,
                           eval_limit=3, pgd_steps=2, cw_steps=2, curve_eps=(4.0, 8.0),
                           autoattack=("apgd-ce4", "apgd-dlr4", "square20")),
}


def plan_for(size: str, *, seed: int = 0, epochs: int | None = None, layout: str = "ntu",
             autoattack: bool = True) -> ReproducePlan:
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    # The paper inserts 3 AMRs on NTU RGB+D and 1 on iMiGUE (Section 4.2).
    plan = dataclasses.replace(SIZES[size], seed=seed, layout=layout, num_amr=1 if layout == "imigue" else 3)
    if not autoattack:
        plan = dataclasses.replace(plan, autoattack=())
    return plan.with_epochs(epochs) if epochs is not None else plan


# Measured on 2 CPU cores (tiny preset, batch 16, torch 2.13 CPU): seconds per clip and
# epoch of training, per clip and attack step (one forward + backward) of evaluation.
COSTS = {
    "synth_clip": 0.07, "prepare_clip": 0.03,
    "train_clean": 0.005, "train_unimodal": 0.0045, "train_at": 0.040, "train_amr": 0.042,
    "train_amr_per_module": 0.0,
    "eval_step_fusion": 0.0030, "eval_step_unimodal": 0.0013,
    "model_overhead": 0.3,
}


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    key: str          # directory / file name
    name: str         # row name in the tables
    arch: str = "fusion"
    defence: str = "none"
    num_amr: int = 0
    lam: float = 1.0
    suites: tuple[tuple[tuple[str, ...], tuple[float, ...]], ...] = ()  # ((attacks), (eps)) pairs

    @property
    def adversarial(self) -> bool:
        return self.defence in ("at-r", "at-s", "at-rs", "amr", "amr-frozen")


def model_specs(plan: ReproducePlan) -> list[ModelSpec]:
    """Every model the plan trains, in training order, each once."""
    standard = ((plan.pgd, plan.cw), (plan.eps,))
    curves = (("fgsm", plan.pgd, plan.cw), tuple(sorted(set(plan.curve_eps) | {plan.eps, plan.table1_eps})))
    table1 = (("fgsm", plan.pgd, plan.cw), (plan.table1_eps,))
    specs = [
        ModelSpec("none", "None", defence="none", suites=(curves,)),
        ModelSpec("rgb", "Unimodal R", arch="rgb", suites=(standard, table1)),
        ModelSpec("skeleton", "Unimodal S", arch="skeleton", suites=(standard, table1)),
        ModelSpec("minsim", "MinSim", defence="minsim", suites=(standard,)),
        ModelSpec("exfmem", "ExFMem", defence="exfmem", suites=(standard,)),
        ModelSpec("minsim-exfmem", "MinSim+ExFMem", defence="minsim-exfmem", suites=(standard,)),
        ModelSpec("at-r", "AT-R", defence="at-r", suites=(standard,)),
        ModelSpec("at-s", "AT-S", defence="at-s", suites=(standard,)),
        ModelSpec("at-rs", "AT-RS", defence="at-rs", suites=(standard,)),
        ModelSpec("amr", "AMR", defence="amr", num_amr=plan.num_amr, suites=(standard,)),
        # The ablation: eq. 12 and the AMR heads with W fixed at 0.5 (is it the reweighting
        # or the loss?), in Table 4 beside the AMR model.
        ModelSpec("amr-frozen", "AMR, W frozen", defence="amr-frozen", num_amr=plan.num_amr, suites=(standard,)),
    ]
    for n in plan.amr_counts:
        if n not in (0, plan.num_amr):
            specs.append(ModelSpec(f"amr-{n}", f"{n} AMR" + ("s" if n > 1 else ""), defence="amr", num_amr=n,
                                   suites=(standard,)))
    keys = {s.key for s in specs}
    for lam in plan.lams:
        key = lam_model_key(plan, lam)
        if key not in keys:  # λ = 1 is Table 4's (or the main) model with lam_num_amr AMRs
            keys.add(key)
            specs.append(ModelSpec(key, f"{plan.lam_num_amr} AMR, λ={_fmt(lam)}", defence="amr",
                                   num_amr=plan.lam_num_amr, lam=lam, suites=(standard,)))
    return specs


def lam_model_key(plan: ReproducePlan, lam: float) -> str:
    if lam == 1.0:
        return "amr" if plan.lam_num_amr == plan.num_amr else f"amr-{plan.lam_num_amr}"
    return f"amr-{plan.lam_num_amr}-lam{_fmt(lam)}"


def amr_count_key(plan: ReproducePlan, n: int) -> str:
    return "at-rs" if n == 0 else "amr" if n == plan.num_amr else f"amr-{n}"


def _configs(plan: ReproducePlan, spec: ModelSpec, num_classes: int, geometry: dict | None = None):
    from .config import resolve_model_config

    model_cfg = preset_config(PRESET, arch=spec.arch, num_classes=num_classes, num_amr=spec.num_amr,
                              **(geometry or {}))
    eps = plan.eps / 255
    train_cfg = TrainConfig(defence=spec.defence, lam=spec.lam,
                            epochs=plan.adv_epochs if spec.adversarial else plan.clean_epochs,
                            batch_size=plan.batch_size, lr=plan.lr, optimizer=plan.optimizer, seed=plan.seed,
                            attack=AttackConfig(name="pgd", mode="RS", steps=plan.train_attack_steps, eps_rgb=eps,
                                                eps_skel=eps, alpha_rgb=2 / 255, alpha_skel=2 / 255))
    return resolve_model_config(model_cfg, train_cfg), train_cfg


def _suite(plan: ReproducePlan, spec: ModelSpec):
    from .evaluate import build_suite

    suite, seen = [], set()
    for attacks, eps in spec.suites:
        for cfg in build_suite(list(attacks), list(MODES), list(eps)):
            key = json.dumps(cfg.to_dict(), sort_keys=True)
            if key not in seen:
                seen.add(key)
                suite.append(cfg)
    return suite


def _autoattack_suite(plan: ReproducePlan):
    from .evaluate import build_suite

    return build_suite(list(plan.autoattack), ["RS"], [plan.eps])


def _autoattack_path(out: Path, key: str) -> Path:
    """AutoAttack reports live apart from the models' own (``reports/*.json`` is one per model)."""
    return out / "reports" / "autoattack" / f"{key}.json"


def _suite_steps(plan: ReproducePlan, spec: ModelSpec) -> int:
    """Forward+backward passes per clip of the evaluation suite (plus the clean pass)."""
    return 1 + sum(1 if c.name == "fgsm" else c.steps for c in _suite(plan, spec))


# --------------------------------------------------------------------------- stages


@dataclass
class Stage:
    kind: str                     # data | train | evaluate | autoattack | tables
    key: str                      # model key (train / evaluate) or "data" / "tables"
    label: str                    # one-line description
    estimate: float               # seconds on 2 CPU cores
    spec: ModelSpec | None = None
    extra: dict = field(default_factory=dict)


def build_stages(plan: ReproducePlan) -> list[Stage]:
    c = COSTS
    stages = [Stage("data", "data", f"synthesise {plan.num_clips} clips and prepare the tiny cache",
                    plan.num_clips * (c["synth_clip"] + c["prepare_clip"]))]
    specs = model_specs(plan)
    for spec in specs:
        if spec.arch != "fusion":
            per_clip = c["train_unimodal"]
        elif spec.defence == "amr":
            per_clip = c["train_amr"] + c["train_amr_per_module"] * spec.num_amr
        elif spec.adversarial:
            per_clip = c["train_at"]
        else:
            per_clip = c["train_clean"]
        if spec.adversarial:
            per_clip *= (plan.train_attack_steps + 1) / 11
        epochs = plan.adv_epochs if spec.adversarial else plan.clean_epochs
        what = f"{spec.defence}" + (f", {spec.num_amr} AMR" if spec.num_amr else "") + \
               (f", λ={_fmt(spec.lam)}" if spec.lam != 1.0 else "")
        stages.append(Stage("train", spec.key, f"train {spec.name} ({spec.arch}, {what}, {epochs} epochs)",
                            c["model_overhead"] + epochs * plan.train_clips * per_clip, spec))
    for spec in specs:
        step = c["eval_step_fusion"] if spec.arch == "fusion" else c["eval_step_unimodal"]
        suite = _suite(plan, spec)
        labels = sorted({f"{a.label}@{_fmt(a.eps_rgb * 255)}" for a in suite})
        stages.append(Stage("evaluate", spec.key, f"evaluate {spec.name} ({len(suite)} attacks: {', '.join(labels)})",
                            c["model_overhead"] + plan.eval_clips * _suite_steps(plan, spec) * step, spec))
    if plan.autoattack:
        # A cascade: APGD-CE on every clean-correct clip, APGD-DLR and Square only on the
        # clips still standing, and a clip leaves an attack once broken. Its cost is that of
        # the clips that survive: costed as if 10 % survive everything and the rest break
        # within 10 steps (a Square query is a forward pass, about a third of a step). The
        # default NTU run, where AutoAttack breaks every clip, took 1-5 s per model.
        steps = {a.name: a.steps for a in _autoattack_suite(plan)}
        per_clip = 0.9 * min(10, steps.get("apgd-ce", 10)) + 0.1 * (
            steps.get("apgd-ce", 0) + steps.get("apgd-dlr", 0) + steps.get("square", 0) / 3)
        labels = " → ".join(a.label for a in _autoattack_suite(plan))
        for spec in specs:
            if spec.arch == "fusion":
                stages.append(Stage("autoattack", spec.key, f"AutoAttack {spec.name} (RS: {labels})",
                                    c["model_overhead"] + plan.eval_clips * per_clip * c["eval_step_fusion"], spec))
    stages.append(Stage("tables", "tables", "write Tables 1-5, Figures 2 and 4, index.html", 1.0))
    return stages



# --------------------------------------------------------------------------- running


class PlanMismatch(ValueError):
    """The output folder was started with another plan."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Plan fields added after a folder may have been started, which only add stages (nothing
# already done changes): a stored plan without one takes the current value, so a rerun of
# an older folder continues it with the new stages instead of refusing it.
ADDED_FIELDS = ("autoattack",)


def _check_plan(plan: ReproducePlan, out: Path) -> None:
    path = out / "plan.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        added = [k for k in ADDED_FIELDS if k not in stored]
        if added:
            stored.update({k: plan.to_dict()[k] for k in added})
            if stored == plan.to_dict():
                _write_atomic(path, json.dumps(stored, indent=2))
        if stored != plan.to_dict():
            diff = sorted(k for k in set(stored) | set(plan.to_dict()) if stored.get(k) != plan.to_dict().get(k))
            raise PlanMismatch(f"{out} was started with another plan (differs in {', '.join(diff)}); "
                               "use a new --out or the same options")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(plan.to_dict(), indent=2))


def run_plan(plan: ReproducePlan, out: str | Path, *, device: str | None = None,
             log: Callable[[str], None] | None = None,
             progress: Callable[[dict], None] | None = None,
             models: Iterable[str] | None = None) -> dict[str, Any]:
    """Run (or continue) ``plan`` in the folder ``out``.

    ``log`` gets one line per stage (start of the run, then each stage as it finishes or
    is skipped, with its duration and the total elapsed time); ``progress`` gets the
    engine's step dicts (``phase`` train/evaluate/data) plus ``stage`` and ``stages``.
    ``models`` (keys of ``plan.models()``) trains and evaluates only those, e.g. the rows a
    finding hinges on, over several seeds; the tables are written once every model of the
    plan has its report, so a later run without ``models`` completes the same folder.
    Returns ``{"out", "stages": [{kind, key, status, seconds}], "seconds", "files"}``.
    """
    out = Path(out)
    only = select_models(plan, models)
    _check_plan(plan, out)
    return _run(plan, out, device, log, progress, only)


def select_models(plan: ReproducePlan, models: Iterable[str] | None) -> set[str] | None:
    """The model keys to run, checked against the plan; None means all of them."""
    if models is None:
        return None
    keys = [s.key for s in plan.models()]
    chosen = [m.strip() for m in models if m.strip()]
    unknown = sorted(set(chosen) - set(keys))
    if unknown or not chosen:
        raise ValueError(f"unknown model {', '.join(unknown) or '(none given)'}; the plan's models are "
                         f"{', '.join(keys)}")
    return set(chosen)


@contextlib.contextmanager
def _flush_denormals():
    """Flush denormals to zero, for training stages only: as adversarial training goes on,
    the inner attack's eval-mode gradients drift into the denormal range and a CPU epoch of
    AT slowed from 5.5 s to 12-15 s (measured on AT-R, default plan). Never during
    evaluation: a flushed gradient is exactly 0, sign(0) = 0 and that coordinate would never
    move, so the same checkpoint could score differently here and under ``evaluate``."""
    import torch

    flush = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _run(plan: ReproducePlan, out: Path, device, log, progress, only: set[str] | None = None) -> dict[str, Any]:
    emit_line = log or (lambda _: None)
    emit = progress or (lambda _: None)
    stages = [s for s in plan.stages() if only is None or s.kind in ("data", "tables") or s.key in only]
    cache = out / "data" / "cache"
    record = out / ("run.json" if only is None else "run-models.json")
    earlier = _earlier_seconds(record)
    t_start = time.perf_counter()
    emit_line(plan.describe())
    results = []
    for index, stage in enumerate(stages, start=1):
        t0 = time.perf_counter()

        def step(p: dict, _index=index, _stage=stage) -> None:
            emit({**p, "stage": _index, "stages": len(stages), "label": _stage.label})

        missing = _missing_reports(plan, out) if stage.kind == "tables" else []
        if missing:
            status = "waiting"  # a --models run: the tables need every model's report
        else:
            status = _run_stage(plan, out, cache, stage, device, step)
        seconds = time.perf_counter() - t0
        results.append({"kind": stage.kind, "key": stage.key, "status": status, "seconds": round(seconds, 2)})
        if status == "skipped" and (stage.kind, stage.key) in earlier:
            results[-1]["done_seconds"] = earlier[(stage.kind, stage.key)]  # what it took when it ran
        elapsed = time.perf_counter() - t_start
        done = ("skipped (already done)" if status == "skipped" else
                f"not yet: {len(missing)} of the plan's reports are missing ({', '.join(missing)})"
                if status == "waiting" else f"done in {seconds:.1f}s (est. {stage.estimate:.0f}s)")
        emit_line(f"[{index:2d}/{len(stages)}] {stage.label}: {done}; elapsed {_clock(elapsed)}")
    total = time.perf_counter() - t_start
    tables = results[-1]["status"] != "waiting"
    summary = {"out": str(out), "plan": plan.to_dict(), "estimate_seconds": round(plan.estimate()["total"], 1),
               "seconds": round(total, 2), "stages": results,
               "files": sorted(table_files(plan) + _figure_files(out)) if tables else []}
    if only is not None:
        summary["models"] = sorted(only)
    _write_atomic(record, json.dumps(summary, indent=2))
    return summary


def _earlier_seconds(record: Path) -> dict[tuple[str, str], float]:
    """Seconds each stage took when it ran, from the folder's previous run record, so that a
    rerun which skips it (e.g. to add a stage) keeps that history."""
    try:
        stages = json.loads(record.read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for s in stages:
        if not isinstance(s, dict):
            continue
        seconds = s.get("seconds") if s.get("status") == "done" else s.get("done_seconds")
        if isinstance(seconds, (int, float)):
            out[(s.get("kind"), s.get("key"))] = seconds
    return out


def _missing_reports(plan: ReproducePlan, out: Path) -> list[str]:
    """The plan's reports not yet written (model keys; "<key> (AutoAttack)" for those)."""
    aa = {s.key for s in plan.stages() if s.kind == "autoattack"}
    return ([s.key for s in plan.models() if not (out / "reports" / f"{s.key}.json").is_file()]
            + [f"{k} (AutoAttack)" for k in sorted(aa) if not _autoattack_path(out, k).is_file()])


def _eval_set(plan: ReproducePlan, cache: Path, meta: dict):
    """The X-Sub test clips every evaluation of the plan runs on (the same for each model)."""
    from .data.cache import ClipDataset

    dataset = ClipDataset(cache, protocol="xsub", split="test", normalisation=meta.get("normalisation"))
    if plan.eval_limit is not None and plan.eval_limit < len(dataset):
        dataset = dataset.subset(plan.eval_limit, seed=plan.seed)
    return dataset


def _run_stage(plan, out: Path, cache: Path, stage: Stage, device, step) -> str:
    if stage.kind == "data":
        if (cache / "meta.json").is_file():
            return "skipped"
        from .data.cache import prepare
        from .data.synth import synthesize
        from .data.synth_imigue import synthesize_imigue

        raw = out / "data" / "raw"
        if plan.layout == "imigue":
            sessions = len(plan.cameras) * len(plan.replications)
            synthesize_imigue(raw, num_classes=plan.classes, subjects=plan.subjects, sessions=sessions,
                              frames=plan.frames, seed=plan.seed, objects=plan.objects, clutter=plan.clutter,
                              progress=lambda d, t: step({"phase": "data", "step": d * plan.classes,
                                                          "steps": 3 * t * plan.classes}))
        else:
            synthesize(raw, num_classes=plan.classes, subjects=plan.subjects, cameras=plan.cameras,
                       replications=plan.replications, frames=plan.frames, seed=plan.seed, objects=plan.objects,
                       clutter=plan.clutter,
                       progress=lambda d, t: step({"phase": "data", "step": d, "steps": 3 * t}))
        n = plan.num_clips
        p = preset_config(PRESET)
        prepare(raw, cache, rgb_frames=p.rgb_frames, rgb_size=p.rgb_size, skel_frames=p.skel_frames,
                progress=lambda d, t: step({"phase": "data", "step": n + d, "steps": n + t}))
        return "done"
    if stage.kind == "train":
        run_dir = out / "runs" / stage.key
        if (run_dir / "model" / "config.json").is_file():
            return "skipped"
        from .data.cache import ClipDataset
        from .train import train

        from .data.layouts import cache_geometry

        dataset = ClipDataset(cache, protocol="xsub", split="train")
        model_cfg, train_cfg = _configs(plan, stage.spec, len(dataset.class_names), cache_geometry(dataset.meta))
        with _flush_denormals():
            train(model_cfg, train_cfg, dataset, run_dir, preset=PRESET, device=device, resume=True,
                  progress=lambda p: step(p) if p["phase"] == "train" else None)
        return "done"
    if stage.kind in ("evaluate", "autoattack"):
        cascade = stage.kind == "autoattack"
        path = _autoattack_path(out, stage.key) if cascade else out / "reports" / f"{stage.key}.json"
        if path.is_file():
            return "skipped"
        from .checkpoint import load_checkpoint
        from .evaluate import evaluate
        from .report import write_report

        model_dir = out / "runs" / stage.key / "model"
        net, meta = load_checkpoint(model_dir)
        # AutoAttack runs as a cascade (each attack only on the clips still standing) and
        # without the diagnostics, which the model's own report already holds.
        suite = _autoattack_suite(plan) if cascade else _suite(plan, stage.spec)
        report, records = evaluate(net, meta, _eval_set(plan, cache, meta), suite, batch_size=plan.eval_batch_size,
                                   seed=plan.seed, device=device, progress=step,
                                   strategy="worst-case" if cascade else "full", diagnostics=not cascade,
                                   dataset_info={"name": "synthetic", "layout": plan.layout, "cache": str(cache),
                                                 "protocol": "xsub",
                                                 "split": "test"},
                                   model_info={"name": stage.spec.name, "key": stage.key,
                                               "checkpoint": str(model_dir)})
        write_report(report, records, path)
        return "done"
    write_outputs(plan, out)
    return "done"


# --------------------------------------------------------------------------- tables

# The paper's numbers, per layout (NTU RGB+D 60 for "ntu", iMiGUE for "imigue"), for
# side-by-side reading. Table 2 is the paper's Table 2 (PGD20), table2-cw its Table 7 (CW30,
# supplementary), Table 4 its Table 4 (CW30).
_T2 = ("name", "clean", "R", "S", "RS", "avg", "ri")
_T4 = ("name", "num_amr", "clean", "R", "S", "RS", "avg", "ri")
_T5 = ("name", "lam", "clean", "R", "S", "RS", "avg", "ri")


def _t1(clean, unimodal_r, unimodal_s, *rows):
    return [{"attack": a, "clean": clean, "R": r, "S": s_, "RS": rs, "avg": avg, "unimodal_R": unimodal_r,
             "unimodal_S": unimodal_s} for a, r, s_, rs, avg in rows]


_TABLE5 = {"dataset": "iMiGUE (the paper gives Table 5 for iMiGUE only)", "attack": "PGD20",
           "rows": [dict(zip(_T5, r)) for r in (
               ("None", None, 62.37, 0.11, 6.97, 0.07, 2.38, 0.0), ("λ=0.1", 0.1, 60.25, 36.23, 59.15, 32.02, 42.47, 37.97),
               ("λ=0.5", 0.5, 45.08, 45.08, 27.39, 27.24, 33.24, 13.57), ("λ=1", 1.0, 43.89, 43.89, 32.85, 32.94, 36.56, 15.70),
               ("λ=2", 2.0, 42.76, 42.76, 34.82, 34.80, 37.46, 15.47), ("λ=5", 5.0, 41.64, 41.64, 37.50, 37.56, 38.9, 15.79))]}

PAPER_BY_LAYOUT = {
    "ntu": {
        "table1": {"dataset": "NTU RGB+D", "note": "printed as PGD10 in the paper's Table 1; ε = 6/255",
                   "rows": _t1(88.09, 81.46, 81.46, ("FGSM", 50.48, 66.42, 22.12, 46.34), ("PGD", 6.39, 25.18, 1.66, 11.08),
                               ("CW", 4.55, 22.46, 0.21, 9.03))},
        "table2": {"dataset": "NTU RGB+D", "attack": "PGD20",
                   "note": "as printed; MinSim's ✗ columns average to 28.94, which gives RI 17.00 by eq. 14",
                   "rows": [dict(zip(_T2, r)) for r in (
                       ("None", 88.09, 2.09, 11.84, 0.15, 4.69, 0.0), ("AT-R", 75.59, 75.59, 4.75, 4.74, 28.36, 11.17),
                       ("AT-S", 78.44, 2.09, 78.31, 2.06, 27.49, 13.15), ("AT-RS", 61.42, 61.41, 40.41, 40.32, 47.38, 16.02),
                       ("MinSim", 80.85, 2.93, 80.85, 3.03, 28.85, 16.92), ("ExFMem", 84.19, 0.00, 60.04, 0.00, 20.01, 11.42),
                       ("MinSim+ExFMem", 82.81, 2.02, 75.77, 2.14, 26.64, 16.67), ("AMR", 81.65, 68.54, 80.40, 66.52, 71.82, 60.69))]},
        "table2-cw": {"dataset": "NTU RGB+D", "attack": "CW30", "note": "the paper's Table 7 (supplementary)",
                      "rows": [dict(zip(_T2, r)) for r in (
                          ("None", 88.09, 0.98, 9.00, 0.00, 3.33, 0.0), ("AT-R", 75.59, 75.59, 2.80, 2.89, 27.09, 11.26),
                          ("AT-S", 78.44, 1.41, 78.31, 1.41, 27.04, 14.06), ("AT-RS", 61.42, 61.41, 38.74, 38.82, 46.32, 16.32),
                          ("MinSim", 80.85, 0.50, 80.84, 0.48, 27.27, 16.70), ("ExFMem", 84.19, 0.00, 60.98, 0.00, 20.33, 13.10),
                          ("MinSim+ExFMem", 82.81, 0.00, 75.60, 0.00, 25.20, 16.59), ("AMR", 81.65, 68.62, 80.35, 66.61, 71.86, 62.09))]},
        "table3": {"dataset": "NTU RGB+D", "rows": [{"index": 1, "mean_rgb": 0.3067, "mean_skel": 0.3187},
                                                    {"index": 2, "mean_rgb": 0.3065, "mean_skel": 0.3275},
                                                    {"index": 3, "mean_rgb": 0.3067, "mean_skel": 0.3240}]},
        "table4": {"dataset": "NTU RGB+D", "attack": "CW30",
                   "rows": [dict(zip(_T4, r)) for r in (
                       ("None", None, 88.09, 0.98, 9.00, 0.00, 3.33, 0.0),
                       ("AT with ✗RS (0 AMR)", 0, 61.42, 61.41, 38.74, 38.82, 46.32, 16.32),
                       ("1 AMR", 1, 76.44, 76.44, 37.89, 37.83, 50.72, 37.74),
                       ("2 AMRs", 2, 81.61, 67.93, 80.53, 66.00, 71.49, 61.68),
                       ("3 AMRs", 3, 81.65, 68.62, 80.35, 66.61, 71.86, 62.09))]},
        "table5": _TABLE5,
    },
    "imigue": {
        "table1": {"dataset": "iMiGUE", "note": "printed as PGD10 in the paper's Table 1; ε = 6/255",
                   "rows": _t1(62.37, 59.48, 46.86, ("FGSM", 6.86, 48.61, 2.52, 19.03), ("PGD", 0.35, 19.94, 0.24, 6.84),
                               ("CW", 0.20, 20.82, 0.26, 7.09))},
        "table2": {"dataset": "iMiGUE", "attack": "PGD20", "note": "as printed",
                   "rows": [dict(zip(_T2, r)) for r in (
                       ("None", 62.37, 0.11, 6.97, 0.07, 2.38, 0.0), ("AT-R", 47.32, 47.32, 0.00, 0.00, 15.77, -1.66),
                       ("AT-S", 60.20, 0.00, 59.87, 0.00, 19.96, 15.41), ("AT-RS", 39.01, 39.01, 31.89, 31.95, 34.28, 8.54),
                       ("MinSim", 60.60, 0.00, 53.28, 0.00, 17.76, 13.61), ("ExFMem", 60.53, 0.00, 43.00, 0.00, 14.33, 10.11),
                       ("MinSim+ExFMem", 60.62, 0.00, 55.05, 0.00, 18.35, 14.22), ("AMR", 43.89, 43.89, 32.85, 32.94, 36.56, 15.70))]},
        "table2-cw": {"dataset": "iMiGUE", "attack": "CW30", "note": "the paper's Table 7 (supplementary)",
                      "rows": [dict(zip(_T2, r)) for r in (
                          ("None", 62.37, 0.13, 6.67, 0.02, 2.27, 0.0), ("AT-R", 47.32, 47.32, 0.00, 0.00, 15.77, -1.55),
                          ("AT-S", 60.20, 0.00, 59.79, 0.00, 19.93, 15.49), ("AT-RS", 39.01, 39.01, 30.94, 30.97, 33.64, 8.01),
                          ("MinSim", 60.60, 0.00, 53.74, 0.02, 17.92, 13.88), ("ExFMem", 60.53, 0.00, 45.19, 0.00, 15.06, 10.95),
                          ("MinSim+ExFMem", 60.62, 0.00, 54.72, 0.00, 18.24, 14.20), ("AMR", 43.89, 43.89, 32.46, 32.50, 36.28, 15.53))]},
        # The paper's training setup puts 1 AMR in the iMiGUE model, yet its Table 3 lists three.
        "table3": {"dataset": "iMiGUE; the paper lists 3 AMRs although its iMiGUE model has 1",
                   "rows": [{"index": 1, "mean_rgb": 0.4666, "mean_skel": 0.4693},
                            {"index": 2, "mean_rgb": 0.4663, "mean_skel": 0.4939},
                            {"index": 3, "mean_rgb": 0.4665, "mean_skel": 0.4905}]},
        "table4": {"dataset": "iMiGUE", "attack": "CW30",
                   "rows": [dict(zip(_T4, r)) for r in (
                       ("None", None, 62.37, 0.13, 6.67, 0.02, 2.27, 0.0),
                       ("AT with ✗RS (0 AMR)", 0, 39.01, 39.01, 30.94, 30.97, 33.64, 8.01),
                       ("1 AMR", 1, 43.89, 43.89, 32.46, 32.50, 36.28, 15.53),
                       ("2 AMRs", 2, 42.93, 42.93, 31.27, 31.16, 35.12, 13.41),
                       ("3 AMRs", 3, 42.38, 42.38, 33.33, 33.42, 36.38, 14.12))]},
        "table5": {**_TABLE5, "dataset": "iMiGUE"},
    },
}

TABLE_FILES = [f"table{n}.{ext}" for n in (1, 2, 3, 4, 5) for ext in ("md", "json")] + \
              ["table2-cw.md", "table2-cw.json", "diagnostics.md", "diagnostics.json", "index.html", "views.json"]
ACC_COLUMNS = (("clean", "✓RS"), ("R", "✗R"), ("S", "✗S"), ("RS", "✗RS"), ("avg", "Avg"))


def _amrs(n: int) -> str:
    return f"{n} AMR" + ("s" if n != 1 else "")


def _figure_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("figure*.svg"))


def table_files(plan: ReproducePlan) -> list[str]:
    """The files ``write_outputs`` writes besides the figures."""
    return TABLE_FILES + (["autoattack.md", "autoattack.json"] if plan.autoattack else [])


def _load(out: Path, key: str) -> dict[str, Any]:
    from .report import load_report

    return load_report(out / "reports" / f"{key}.json")


def _num(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(head: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    """A GitHub markdown table; floats with ``digits`` decimals, None as –."""
    def cell(v: Any) -> str:
        return _num(v, digits) if isinstance(v, float) or v is None else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _comparison_rows(rows: list[dict], first: str = "name", extra: tuple[str, ...] = ()) -> list[list[Any]]:
    return [[r[first], *(r.get(k) for k in extra), *(r[k] for k, _ in ACC_COLUMNS), r["ri"]] for r in rows]


def _write_table(out: Path, stem: str, data: dict[str, Any], markdown: str) -> None:
    _write_atomic(out / f"{stem}.json", json.dumps({"schema": TABLE_SCHEMA, **data}, indent=2, ensure_ascii=False))
    _write_atomic(out / f"{stem}.md", markdown + "\n")


def write_outputs(plan: ReproducePlan, out: str | Path) -> list[str]:
    """Tables 1–5, Figures 2 and 4 and ``index.html`` from the reports in ``out/reports``."""
    from . import views

    out = Path(out)
    pgd, cw = plan.pgd.upper(), plan.cw.upper()
    PAPER = PAPER_BY_LAYOUT[plan.layout]  # noqa: N806 - the paper's tables of this layout's dataset
    reports = {spec.key: _load(out, spec.key) for spec in model_specs(plan)}
    n_eval = reports["none"]["dataset"]["num_samples"]
    scale = (f"synthetic set, {plan.classes} classes, tiny preset; {n_eval} X-Sub test clips; "
             f"plan {plan.size}, seed {plan.seed}")

    # Table 1: modal robustness of None at table1_eps, unimodal clean accuracies.
    t1_keys = ["none", "rgb", "skeleton"]
    modal = views.modal_table([reports[k] for k in t1_keys], eps=plan.table1_eps,
                              names=["None", "Unimodal R", "Unimodal S"])
    group = modal["groups"][0]
    t1_rows = [{k: r[k] for k in ("attack", "clean", "R", "S", "RS", "avg", "unimodal_R", "unimodal_S")}
               for r in group["rows"]]
    # Robustness of the unimodal models themselves under the attack on their modality.
    unimodal_attacked = {}
    for key, mode in (("rgb", "R"), ("skeleton", "S")):
        unimodal_attacked[key] = {a["label"]: a["modes"][mode]["accuracy"] for a in reports[key]["attacks"]
                                  if round(a["eps_rgb"] * 255, 3) == round(plan.table1_eps, 3)}
    for r in t1_rows:
        r["unimodal_R_attacked"] = unimodal_attacked["rgb"].get(r["attack"])
        r["unimodal_S_attacked"] = unimodal_attacked["skeleton"].get(r["attack"])
    head = ["Attack", "✓RS", "✗R", "✗S", "✗RS", "Avg", "Unimodal ✓R", "Unimodal ✓S", "Unimodal ✗R", "Unimodal ✗S"]
    md = [f"# Table 1 — modal robustness of the undefended model (ε = {_fmt(plan.table1_eps)}/255)", "", scale, "",
          markdown_table(head, [[r["attack"], r["clean"], r["R"], r["S"], r["RS"], r["avg"], r["unimodal_R"],
                                 r["unimodal_S"], r["unimodal_R_attacked"], r["unimodal_S_attacked"]] for r in t1_rows]),
          "", "Unimodal ✗R / ✗S: the unimodal model under the same attack on its one modality (not in the paper).",
          "", f"Paper ({PAPER['table1']['dataset']}; {PAPER['table1']['note']}):", "",
          markdown_table(head[:8], [[r["attack"], r["clean"], r["R"], r["S"], r["RS"], r["avg"], r["unimodal_R"],
                                     r["unimodal_S"]] for r in PAPER["table1"]["rows"]])]
    _write_table(out, "table1", {"table": 1, "title": "Modal robustness", "eps": plan.table1_eps, "scale": scale,
                                 "models": {"fusion": "none", "unimodal_R": "rgb", "unimodal_S": "skeleton"},
                                 "rows": t1_rows, "paper": PAPER["table1"]}, "\n".join(md))

    # Table 2: the eight defences, RI against None (PGD20; CW30 as table2-cw).
    t2_keys = ["none", "at-r", "at-s", "at-rs", "minsim", "exfmem", "minsim-exfmem", "amr"]
    t2_names = [s.name for k in t2_keys for s in model_specs(plan) if s.key == k]
    table2 = {}
    for stem, label in (("table2", pgd), ("table2-cw", cw)):
        view = views.defence_table([reports[k] for k in t2_keys], baseline=0, attack=label, eps=plan.eps, names=t2_names)
        table2[stem] = view
        md = [f"# Table 2 — defences against {label} (ε = {_fmt(plan.eps)}/255), RI against None", "", scale, "",
              markdown_table(["Defence", "✓RS", "✗R", "✗S", "✗RS", "Avg", "RI"], _comparison_rows(view["rows"]))]
        paper = PAPER[stem]
        if paper:
            md += ["", f"Paper ({paper['dataset']}, {paper['attack']}; {paper['note']}):", "",
                   markdown_table(["Defence", "✓RS", "✗R", "✗S", "✗RS", "Avg", "RI"], _comparison_rows(paper["rows"]))]
        _write_table(out, stem, {"table": 2, "title": "Defence comparison", "attack": label, "eps": plan.eps,
                                 "baseline": "None", "scale": scale, "models": dict(zip(t2_names, t2_keys)),
                                 "rows": view["rows"], "paper": paper}, "\n".join(md))

    # Table 3 / Figure 4: AMR weights of the AMR model.
    amr_view = views.amr_weights(reports["amr"], "AMR")
    t3_rows = [{k: a[k] for k in ("index", "layer_rgb", "layer_skel", "mean_rgb", "mean_skel")} for a in amr_view["amrs"]]
    head = ["", *(f"AMR {a['index']}" for a in t3_rows)]
    md = [f"# Table 3 — mean AMR weights of the AMR model ({_amrs(plan.num_amr)})", "", scale, "",
          markdown_table(head, [["Mean value of W_R", *(a["mean_rgb"] for a in t3_rows)],
                                ["Mean value of W_s", *(a["mean_skel"] for a in t3_rows)],
                                ["Layers (RGB / skeleton)", *(f"{a['layer_rgb']} / {a['layer_skel']}" for a in t3_rows)]], 4),
          "", f"Paper ({PAPER['table3']['dataset']}):", "",
          markdown_table(["", *(f"AMR {a['index']}" for a in PAPER["table3"]["rows"])],
                         [["Mean value of W_R", *(a["mean_rgb"] for a in PAPER["table3"]["rows"])],
                          ["Mean value of W_s", *(a["mean_skel"] for a in PAPER["table3"]["rows"])]], 4)]
    _write_table(out, "table3", {"table": 3, "title": "AMR weights", "model": "amr", "scale": scale, "rows": t3_rows,
                                 "paper": PAPER["table3"]}, "\n".join(md))

    # Table 4: number of AMRs against CW30 (0 = AT-RS).
    t4_keys = ["none", *(amr_count_key(plan, n) for n in sorted(plan.amr_counts)), "amr-frozen"]
    t4_names = ["None", *(("AT-RS (0 AMR)" if n == 0 else f"{n} AMR" + ("s" if n > 1 else "")) for n in sorted(plan.amr_counts)),
                f"{_amrs(plan.num_amr)}, W frozen at 0.5"]
    view4 = views.defence_table([reports[k] for k in t4_keys], baseline=0, attack=cw, eps=plan.eps, names=t4_names)
    for row, n in zip(view4["rows"], [None, *sorted(plan.amr_counts), plan.num_amr]):
        row["num_amr"] = n
    view4["rows"][-1]["frozen"] = True
    md = [f"# Table 4 — number of AMRs against {cw} (ε = {_fmt(plan.eps)}/255), RI against None", "", scale, "",
          markdown_table(["Defence", "AMRs", "✓RS", "✗R", "✗S", "✗RS", "Avg", "RI"],
                         _comparison_rows(view4["rows"], extra=("num_amr",))),
          "", f"Paper ({PAPER['table4']['dataset']}, {PAPER['table4']['attack']}):", "",
          markdown_table(["Defence", "AMRs", "✓RS", "✗R", "✗S", "✗RS", "Avg", "RI"],
                         _comparison_rows(PAPER["table4"]["rows"], extra=("num_amr",)))]
    _write_table(out, "table4", {"table": 4, "title": "Number of AMRs", "attack": cw, "eps": plan.eps,
                                 "baseline": "None", "scale": scale, "models": dict(zip(t4_names, t4_keys)),
                                 "rows": view4["rows"], "paper": PAPER["table4"]}, "\n".join(md))

    # Table 5: λ with lam_num_amr AMRs against PGD20.
    lams = sorted(plan.lams)
    t5_keys = ["none", *(lam_model_key(plan, lam) for lam in lams)]
    t5_names = ["None", *(f"λ={_fmt(lam)}" for lam in lams)]
    view5 = views.defence_table([reports[k] for k in t5_keys], baseline=0, attack=pgd, eps=plan.eps, names=t5_names)
    for row, lam in zip(view5["rows"], [None, *lams]):
        row["lam"] = lam
    md = [f"# Table 5 — λ with {plan.lam_num_amr} AMR against {pgd} (ε = {_fmt(plan.eps)}/255), RI against None", "",
          scale, "",
          markdown_table(["Defence", "λ", "✓RS", "✗R", "✗S", "✗RS", "Avg", "RI"], _comparison_rows(view5["rows"], extra=("lam",))),
          "", f"Paper ({PAPER['table5']['dataset']}, {PAPER['table5']['attack']}):", "",
          markdown_table(["Defence", "λ", "✓RS", "✗R", "✗S", "✗RS", "Avg", "RI"],
                         _comparison_rows(PAPER["table5"]["rows"], extra=("lam",)))]
    _write_table(out, "table5", {"table": 5, "title": "λ of eq. 12", "attack": pgd, "eps": plan.eps,
                                 "num_amr": plan.lam_num_amr, "baseline": "None", "scale": scale,
                                 "models": dict(zip(t5_names, t5_keys)), "rows": view5["rows"],
                                 "paper": PAPER["table5"]}, "\n".join(md))

    # Worst case and gradient-masking diagnostics of every model (not in the paper).
    diag_rows = []
    for spec in model_specs(plan):
        rep = reports[spec.key]
        worst = [w for w in rep.get("worst_case") or [] if round(w["eps_rgb"] * 255, 3) == round(plan.eps, 3)]
        d = rep.get("diagnostics") or {}
        zero = d.get("zero_gradient") or {}
        unbounded = d.get("unbounded") or {}
        diag_rows.append({"name": spec.name, "key": spec.key, "clean": rep["clean"]["accuracy"],
                          "worst_RS": worst[0]["modes"].get("RS", {}).get("accuracy") if worst else None,
                          "worst_overall": worst[0]["overall"]["accuracy"] if worst else None,
                          "unbounded": unbounded.get("accuracy"), "zero_grad_rgb": zero.get("rgb"),
                          "zero_grad_skel": zero.get("skel"),
                          "flags": [f["check"] for f in d.get("flags", [])]})
    md = [f"# Worst case and gradient-masking diagnostics (ε = {_fmt(plan.eps)}/255)", "", scale, "",
          "Worst case: a clip is robust only if no attack of the model's suite (every mode) broke it. Unbounded: "
          "PGD50 from the clean input in RS with ε = 1 (the whole [0, 1] box), which must reach ~0%. Zero grad: % of clean-correct clips "
          "whose CE input gradient is exactly zero. Flags: docs/REPORT.md.", "",
          markdown_table(["Model", "✓RS", "worst ✗RS", "worst overall", "unbounded", "zero grad R %",
                          "zero grad S %", "flags"],
                         [[r["name"], r["clean"], r["worst_RS"], r["worst_overall"], r["unbounded"], r["zero_grad_rgb"],
                           r["zero_grad_skel"], ", ".join(r["flags"]) or "none"] for r in diag_rows])]
    _write_table(out, "diagnostics", {"title": "Worst case and diagnostics", "eps": plan.eps, "scale": scale,
                                      "rows": diag_rows}, "\n".join(md))

    aa_rows = _autoattack_table(plan, out, reports, scale) if plan.autoattack else []

    # Figure 2 (None: accuracy vs ε per attack) and Figure 4 (AMR per-channel weights).
    for old in out.glob("figure*.svg"):
        old.unlink()
    curves = views.robustness_curves([reports["none"]], ["None"])
    for panel in curves["panels"]:
        stem = f"figure2-{panel['attack'].lower()}"
        _write_atomic(out / f"{stem}.svg", views.svg_document(views.curves_figure(panel, stem)))
    for amr in amr_view["amrs"]:
        stem = f"figure4-amr{amr['index']}"
        _write_atomic(out / f"{stem}.svg", views.svg_document(views.amr_figure("AMR", amr, stem)))

    # index.html: the views of models.views, restricted to the models of each table.
    all_names = [spec.name for spec in model_specs(plan)]
    all_reports = [reports[spec.key] for spec in model_specs(plan)]
    page_views = {
        "schema": views.VIEWS_SCHEMA,
        "reports": [s.name for s in model_specs(plan)],
        "robustness_curves": curves,
        "modal_table": modal,
        "defence_table": table2["table2"],
        "amr_weights": [amr_view],
        "worst_case": views.worst_case(all_reports, all_names),
        "diagnostics": views.diagnostics(all_reports, all_names),
    }
    extra = [("table2-cw", f"Defence comparison against {cw} (Table 2, CW)", table2["table2-cw"]),
             ("amr-count", f"Number of AMRs (Table 4, {cw})", view4),
             ("lambda", f"λ with {plan.lam_num_amr} AMR (Table 5, {pgd})", view5)]
    _write_atomic(out / "views.json", json.dumps({**page_views, "extra_tables": {k: v for k, _, v in extra}},
                                                 indent=2, ensure_ascii=False))
    title = f"robustact reproduce — {plan.size} plan ({scale})"
    sections = []
    if aa_rows:
        sections.append(("autoattack", f"AutoAttack in RS (ε = {_fmt(plan.eps)}/255)",
                         views.plain_table_html(AA_NOTE, AA_HEAD, [_aa_cells(r) for r in aa_rows])))
    _write_atomic(out / "index.html", views.views_html(page_views, title=title, extra_tables=extra,
                                                       extra_sections=sections))
    return sorted(table_files(plan) + _figure_files(out))


AA_HEAD = ["Model", "✓RS", "✗RS {pgd}", "✗RS {cw}", "✗RS worst case", "✗RS AutoAttack", "✗RS worst of all",
           "only AutoAttack broke", "only the suite broke"]
AA_NOTE = ("✗RS worst case: no attack of the model's suite (PGD, CW; modes R, S and RS, since an R- or "
           "S-only perturbation is an RS one) broke the clip. AutoAttack: APGD-CE → APGD-DLR → Square in RS, "
           "each only on the clips still standing. Worst of all: neither broke it, clip by clip; the number to "
           "quote. The last two columns count clips (of the clean-correct ones) that one side broke and the "
           "other missed.")


def _aa_cells(r: dict[str, Any]) -> list[Any]:
    return [r["name"], r["clean"], r["pgd_RS"], r["cw_RS"], r["worst_RS"], r["autoattack_RS"], r["worst_of_all_RS"],
            r["only_autoattack"], r["only_suite"]]


def autoattack_numbers(out: str | Path, key: str, eps: float,
                       report: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """✗RS of model ``key`` under AutoAttack, and clip by clip under AutoAttack and its own
    report's suite together (robust only if neither broke the clip; R- and S-only breaks of
    the suite count, being RS perturbations too), at budget ``eps``/255; None when the
    folder has no AutoAttack report for it. Refuses reports of other weights or clips.
    ``report``: the model's own report when already loaded."""
    import numpy as np

    from .evaluate import ClipRecords
    from .report import load_report, worst_case_entry

    out = Path(out)
    aa_path = _autoattack_path(out, key)
    if not aa_path.is_file():
        return None
    rep, aa = report or _load(out, key), load_report(aa_path)
    own = ClipRecords.load(out / "reports" / rep["per_clip"]["file"])
    cascade = ClipRecords.load(aa_path.with_name(aa["per_clip"]["file"]))
    if (aa["model"].get("weights_sha256") != rep["model"].get("weights_sha256")
            or not np.array_equal(own.clip, cascade.clip) or not np.array_equal(own.clean_pred, cascade.clean_pred)):
        raise ValueError(f"{aa_path} was not run on the checkpoint and clips of reports/{key}.json "
                         "(a model retrained since?); delete it and rerun to attack the current one")
    at_eps = [e for e, c in enumerate(own.suite) if round(c["eps_rgb"] * 255, 3) == round(eps, 3)]
    aa_eps = [e for e, c in enumerate(cascade.suite) if round(c["eps_rgb"] * 255, 3) == round(eps, 3)]
    clean_ok = own.clean_correct
    suite_ok = clean_ok & ~(own.outcome[:, at_eps] == 1).any(axis=1)
    aa_ok = clean_ok & ~(cascade.outcome[:, aa_eps] == 1).any(axis=1)
    entry = worst_case_entry(aa, eps)
    return {"autoattack_RS": entry["modes"]["RS"]["accuracy"] if entry else None,
            "worst_of_all_RS": 100.0 * float((suite_ok & aa_ok).sum()) / len(own),
            "only_autoattack": int((suite_ok & ~aa_ok).sum()), "only_suite": int((aa_ok & ~suite_ok).sum()),
            "autoattack": [a["label"] for a in aa["attacks"]]}


def _autoattack_table(plan: ReproducePlan, out: Path, reports: dict[str, dict], scale: str) -> list[dict]:
    """``autoattack.md|json``: per fusion model, ✗RS under the suite, under AutoAttack and
    under both, clip by clip (a clip counts as robust only if neither broke it)."""
    from .report import find_attack, worst_case_entry

    rows = []
    for spec in model_specs(plan):
        if spec.arch != "fusion":
            continue
        rep = reports[spec.key]
        rows.append({"name": spec.name, "key": spec.key, "clean": rep["clean"]["accuracy"],
                     "pgd_RS": find_attack(rep, plan.pgd.upper(), plan.eps)["modes"]["RS"]["accuracy"],
                     "cw_RS": find_attack(rep, plan.cw.upper(), plan.eps)["modes"]["RS"]["accuracy"],
                     "worst_RS": worst_case_entry(rep, plan.eps)["modes"]["RS"]["accuracy"],
                     **autoattack_numbers(out, spec.key, plan.eps, rep)})
    head = [h.format(pgd=plan.pgd.upper(), cw=plan.cw.upper()) for h in AA_HEAD]
    labels = " → ".join(rows[0]["autoattack"]) if rows else ""
    md = [f"# AutoAttack in RS (ε = {_fmt(plan.eps)}/255): {labels}", "", scale, "", AA_NOTE, "",
          markdown_table(head, [_aa_cells(r) for r in rows])]
    _write_table(out, "autoattack", {"title": "AutoAttack", "eps": plan.eps, "attacks": labels, "scale": scale,
                                     "rows": rows}, "\n".join(md))
    return rows


# --------------------------------------------------------------------------- helpers


def _fmt(value: float) -> str:
    return f"{value:g}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
