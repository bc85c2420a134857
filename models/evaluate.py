"""Evaluation of an attack suite on a dataset split.

The primary output is a per-clip table (``ClipRecords``): label, clean prediction and, for
every suite entry (attack × ε × mode), whether it broke the clip and at which iterate.
Everything a report says is an aggregate of that table (``models.report.build_report``):
per-attack accuracy, worst case per mode and overall, per class, and the gradient-masking
diagnostics. Tables computed anywhere (batches, shards) concatenate.

Rules (RobustBench / AutoAttack):

* a clip counts as robust only if it is classified correctly clean AND no attack broke it,
  so robust ≤ clean by construction; clips wrong on clean input are never attacked;
* an attack breaks a clip if any of its iterates (any restart) is misclassified;
* a clip's random start depends on (seed, clip id, suite entry, restart) only, never on
  its batch, so batch size and sharding do not change a result;
* strategy ``full`` runs every entry on every clean-correct clip (the paper's per-attack
  columns); ``worst-case`` runs, per budget, the R then the S entries (gradient attacks
  cheapest first, then score-based ones) on the clips still standing in that mode, then the
  RS entries on the clips standing in both — the same worst case, far cheaper;
* an R-only or S-only perturbation is also an RS perturbation, so the RS worst case counts
  a clip broken by an attack of any mode of the same budget.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .attacks import run_attack
from .checkpoint import resolve_device
from .config import ATTACKS, DEFAULT_STEPS, GRADIENT_ATTACKS, MODES, AttackConfig, ConfigError, max_steps

STRATEGIES = ("full", "worst-case")
# ClipRecords.outcome codes.
SURVIVED, BROKEN, CLEAN_WRONG, SKIPPED = 0, 1, -1, -2
RECORDS_FORMAT = "robustact.clips/v1"
# The unbounded-attack check: PGD in RS over the whole [0, 1] box (ε = 1 for both
# modalities), from the clean input: 50 steps of 0.02 can reach any point of the box. A
# random start in a ball that large throws the clip away, and coarse steps (0.1) bounce
# between corners: on the reproduce models both left whole classes standing that this
# configuration breaks.
UNBOUNDED = AttackConfig(name="pgd", mode="RS", steps=50, eps_rgb=1.0, eps_skel=1.0, alpha_rgb=0.02,
                         alpha_skel=0.02, random_start=False)
AUTOATTACK = ("apgd-ce", "apgd-dlr", "square")


class EvaluationCancelled(Exception):
    """``should_stop()`` asked the evaluation to stop."""


def _counts_up_to(maximum: int) -> str:
    """Regular expression of the decimal integers 1..``maximum`` (a power of ten), written
    without leading zeros."""
    digits = len(str(maximum)) - 1
    if maximum != 10**digits:
        raise ValueError(f"{maximum} is not a power of ten")
    return f"[1-9][0-9]{{0,{digits - 1}}}|{maximum}"


def _attack_spec_pattern() -> str:
    counted: dict[int, list[str]] = {}
    for name in ATTACKS:
        if name != "fgsm":
            counted.setdefault(max_steps(name), []).append(name)
    alternatives = ["fgsm", "autoattack"]
    for limit, names in counted.items():
        name = names[0] if len(names) == 1 else f"(?:{'|'.join(names)})"
        alternatives.append(f"{name}(?:{_counts_up_to(limit)})?")
    return f"^(?:{'|'.join(alternatives)})$"


# Every attack string a suite accepts, as one regular expression (also the ``pattern`` of
# the REST schema, so OpenAPI documents it; the ECMA, Rust and Python dialects read it
# alike): lower case, nothing around, an optional count (iterations; queries for Square)
# without leading zeros and within MAX_STEPS / MAX_QUERIES, or the autoattack preset.
#   ^(?:fgsm|autoattack|(?:pgd|cw|apgd-ce|apgd-dlr)(?:[1-9][0-9]{0,2}|1000)?|square(?:[1-9][0-9]{0,3}|10000)?)$
ATTACK_SPEC_PATTERN = _attack_spec_pattern()
ATTACK_SPEC_MAX_LENGTH = max(len(name) + len(str(max_steps(name))) for name in ATTACKS)
# What parse_attack_spec reads before it checks the count, so its errors can say what is wrong.
_ATTACK_SPEC = re.compile(f"({'|'.join(ATTACKS)})([0-9]*)")


def parse_attack_spec(spec: str) -> tuple[str, int]:
    """"fgsm" → ("fgsm", 1); "pgd20" → ("pgd", 20); "cw" → ("cw", 30); "apgd-ce" → 100;
    "square5000" → ("square", 5000). Accepts exactly the strings ATTACK_SPEC_PATTERN admits,
    but ``autoattack`` (a preset: ``expand_attacks``)."""
    shown = repr(spec if len(spec) <= 40 else spec[:40] + "...")
    m = _ATTACK_SPEC.fullmatch(spec)
    if not m:
        normal = spec.strip().lower()
        if normal != spec and (normal == "autoattack" or _ATTACK_SPEC.fullmatch(normal)):
            raise ConfigError("attacks", f"unknown attack {shown}: attack names are lower case, without spaces "
                                         f"({normal!r})")
        raise ConfigError("attacks", f"unknown attack {shown} (use fgsm, pgdK, cwK, apgd-ce[K], apgd-dlr[K], "
                                     "square[K] or autoattack, e.g. pgd20)")
    name, count = m.groups()
    if name == "fgsm":
        if count:
            raise ConfigError("attacks", f"FGSM takes no step count ({shown})")
        return name, 1
    if not count:
        return name, DEFAULT_STEPS[name]
    limit, unit = max_steps(name), "queries" if name == "square" else "steps"
    if count.startswith("0"):
        raise ConfigError("attacks", f"{shown}: the number of {unit} is at least 1, written without leading zeros")
    if len(count) > len(str(limit)) or int(count) > limit:
        raise ConfigError("attacks", f"{shown}: at most {limit} {unit}")
    return name, int(count)


def expand_attacks(attacks: Sequence[str]) -> list[str]:
    """``autoattack`` → APGD-CE, APGD-DLR, Square (AutoAttack's standard budget)."""
    out: list[str] = []
    for spec in attacks:
        out.extend(AUTOATTACK if spec == "autoattack" else [spec])
    return out


def default_strategy(attacks: Sequence[str]) -> str:
    """``worst-case`` when the suite names the ``autoattack`` preset (a cascade by
    definition), else ``full``."""
    return "worst-case" if "autoattack" in attacks else "full"


def build_suite(attacks: Sequence[str], modes: Sequence[str] = MODES, eps: Sequence[float] = (8.0,),
                alpha: float = 2.0, random_start: bool = True, restarts: int = 1) -> list[AttackConfig]:
    """Attack configs for every attack × ε × mode. ε and α are given in 1/255 units.
    ``restarts`` applies to the randomised attacks (FGSM, and PGD/CW without a random
    start, run once)."""
    suite = []
    for spec in expand_attacks(attacks):
        name, steps = parse_attack_spec(spec)
        for e in eps:
            for mode in modes:
                cfg = AttackConfig(name=name, mode=mode, steps=steps, eps_rgb=e / 255, eps_skel=e / 255,
                                   alpha_rgb=alpha / 255, alpha_skel=alpha / 255, random_start=random_start)
                if restarts > 1 and cfg.randomised:
                    cfg = AttackConfig(**{**cfg.to_dict(), "restarts": restarts})
                suite.append(cfg)
    return suite


def check_suite(suite: Sequence[AttackConfig], num_classes: int) -> None:
    """Refuse what cannot run on a model with ``num_classes`` classes."""
    if num_classes < 3 and any(c.name == "apgd-dlr" for c in suite):
        raise ConfigError("attacks", f"apgd-dlr needs at least 3 classes; the model has {num_classes}")


# ------------------------------------------------------------------------------ records


@dataclass
class ClipRecords:
    """Per-clip results of one evaluation (or one shard of it), one row per clip.

    ``outcome[i, e]``: 1 entry e broke clip i, 0 it survived, -1 not attacked (wrong on
    clean input), -2 not attacked (worst-case cascade: already broken in that mode).
    ``iterate`` / ``restart``: the iterate (query for Square) and restart that broke it, -1
    otherwise. Diagnostics per clip: ``grad_zero_rgb`` / ``grad_zero_skel`` (1 the clean CE
    gradient w.r.t. that modality is exactly zero, 0 not, -1 the model ignores it),
    ``unbounded`` (outcome of the ε = 1 RS PGD; -1 not run), ``unstable`` (two clean passes
    gave different logits), ``probabilities`` (the outputs look like softmax, not logits).
    """

    suite: list[dict[str, Any]]
    clip: np.ndarray
    label: np.ndarray
    clean_pred: np.ndarray
    outcome: np.ndarray
    iterate: np.ndarray
    restart: np.ndarray
    grad_zero_rgb: np.ndarray
    grad_zero_skel: np.ndarray
    unbounded: np.ndarray
    unstable: np.ndarray
    probabilities: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    ARRAYS = ("clip", "label", "clean_pred", "outcome", "iterate", "restart", "grad_zero_rgb", "grad_zero_skel",
              "unbounded", "unstable", "probabilities")

    def __len__(self) -> int:
        return len(self.clip)

    @property
    def clean_correct(self) -> np.ndarray:
        return self.clean_pred == self.label

    @classmethod
    def empty(cls, suite: Sequence[dict[str, Any]]) -> "ClipRecords":
        e = len(suite)
        z = np.zeros(0, dtype=np.int64)
        s8 = np.zeros(0, dtype=np.int8)
        return cls(list(suite), z, z.copy(), z.copy(), np.zeros((0, e), np.int8), np.zeros((0, e), np.int32),
                   np.zeros((0, e), np.int16), s8, s8.copy(), s8.copy(), s8.copy(), s8.copy())

    @classmethod
    def concat(cls, parts: Sequence["ClipRecords"]) -> "ClipRecords":
        """Rows of several tables of the same suite, sorted by clip id (shards merge here)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        suite = parts[0].suite
        for p in parts[1:]:
            if p.suite != suite:
                raise ValueError("records of different suites cannot be concatenated")
        arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in cls.ARRAYS}
        order = np.argsort(arrays["clip"], kind="stable")
        if len(order) > 1 and np.any(np.diff(arrays["clip"][order]) == 0):
            raise ValueError("a clip appears in two record tables")
        return cls(list(suite), **{k: v[order] for k, v in arrays.items()}, meta=dict(parts[0].meta))

    def save(self, path_or_file) -> None:
        """``.npz`` of plain arrays (no pickle); the suite and meta as JSON text. Takes a
        path or a binary file object."""
        header = json.dumps({"format": RECORDS_FORMAT, "suite": self.suite, "meta": self.meta})
        arrays = {"header": np.array(header), **{k: getattr(self, k) for k in self.ARRAYS}}
        if hasattr(path_or_file, "write"):
            np.savez_compressed(path_or_file, **arrays)
            return
        with open(path_or_file, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path_or_file) -> "ClipRecords":
        with np.load(path_or_file, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != RECORDS_FORMAT:
                raise ValueError(f"not a {RECORDS_FORMAT} file")
            return cls(header["suite"], **{k: data[k] for k in cls.ARRAYS}, meta=header.get("meta", {}))

    def to_json(self) -> dict[str, Any]:
        return {"format": RECORDS_FORMAT, "suite": self.suite, "meta": self.meta,
                **{k: getattr(self, k).tolist() for k in self.ARRAYS}}


def check_normalisation(dataset, meta: dict[str, Any]) -> None:
    """Refuse a dataset (or a Subset of one) whose skeleton constants differ from the
    checkpoint's ``normalisation``."""
    norm = meta.get("normalisation")
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    if not norm or not hasattr(base, "skel_min"):
        return
    have = [float(v) for v in (*base.skel_min, *base.skel_max)]
    want = [float(v) for v in (*norm["skel_min"], *norm["skel_max"])]
    if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(have, want)):
        raise ValueError(f"the dataset scales skeletons with skel_min {list(base.skel_min)}, skel_max "
                         f"{list(base.skel_max)}; the model was trained with {norm['skel_min']}, {norm['skel_max']}: "
                         "open it with the checkpoint's normalisation (ClipDataset(..., "
                         "normalisation=meta['normalisation']))")


def clip_identities(dataset) -> list[int]:
    """Stable clip ids: positions in the prepared cache when the dataset knows them."""
    if isinstance(dataset, Subset):
        inner = clip_identities(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    indices = getattr(dataset, "indices", None)
    if indices is not None and len(indices) == len(dataset):
        return [int(i) for i in indices]
    return list(range(len(dataset)))


def cascade_order(suite: Sequence[AttackConfig]) -> list[list[int]]:
    """Chains of suite indices for the worst-case strategy: per budget, the R entries, the
    S entries, then the RS entries; within a chain gradient attacks cheapest first, then
    score-based ones (so the black-box check sees what white-box attacks missed)."""
    budgets: dict[tuple, dict[str, list[int]]] = {}
    for i, cfg in enumerate(suite):
        budgets.setdefault((cfg.eps_rgb, cfg.eps_skel), {}).setdefault(cfg.mode, []).append(i)
    chains = []
    for per_mode in budgets.values():
        for mode in MODES:
            if mode in per_mode:
                chains.append(sorted(per_mode[mode], key=lambda i: (suite[i].name not in GRADIENT_ATTACKS,
                                                                    suite[i].cost, i)))
    return chains


# ------------------------------------------------------------------------------ running


def _clean_pass(model, rgb, skel, labels):
    """Clean logits, the CE input gradients (zero-gradient check) and a second pass
    (randomised-output check)."""
    leaves = [rgb.detach().requires_grad_(True), skel.detach().requires_grad_(True)]
    with torch.enable_grad():
        logits = model(*leaves).logits
        loss = F.cross_entropy(logits, labels, reduction="sum")
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else (None, None)
    logits = logits.detach()
    with torch.no_grad():
        again = model(rgb, skel).logits
    scale = 1e-4 * (1 + logits.abs().amax(dim=1))
    unstable = ((again - logits).abs().amax(dim=1) > scale) | (again.argmax(1) != logits.argmax(1))
    probs = (logits.min(dim=1).values >= 0) & (logits.max(dim=1).values <= 1) & ((logits.sum(1) - 1).abs() < 1e-4)

    def zero(g):
        if g is None:
            return torch.full((len(labels),), -1, dtype=torch.int8)
        return (g.flatten(1) == 0).all(dim=1).to(torch.int8).cpu()

    return logits, zero(grads[0]), zero(grads[1]), unstable.to(torch.int8).cpu(), probs.to(torch.int8).cpu()


def run_records(model, dataset, suite: Sequence[AttackConfig], *, batch_size: int = 16, seed: int = 0,
                strategy: str = "full", diagnostics: bool = True, device: str | None = None,
                progress: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                clip_ids: Sequence[int] | None = None, num_workers: int = 0) -> ClipRecords:
    """Attack every clip of ``dataset`` with ``suite`` and return the per-clip table.

    Stage by stage, AutoAttack style: a clean pass over every clip, then each suite entry
    over the clips it has to attack, re-batched (``batch_size``) so that a cascade's few
    survivors still fill whole batches. Per-clip random streams make the result independent
    of that batching. ``num_workers`` DataLoader processes read (and, from a ``jpeg``
    cache, decode) the clips of each stage while the model runs; the result does not
    depend on it (the order is fixed and loading draws no random number)."""
    if strategy not in STRATEGIES:
        raise ConfigError("strategy", f"must be one of {STRATEGIES}, got {strategy!r}")
    suite = list(suite)
    device = resolve_device(device)
    model = model.to(device).eval()
    check_suite(suite, model.cfg.num_classes if hasattr(model, "cfg") else 3)
    ids = np.asarray(list(clip_ids) if clip_ids is not None else clip_identities(dataset), dtype=np.int64)
    if len(ids) != len(dataset):
        raise ValueError(f"{len(ids)} clip ids for {len(dataset)} clips")
    emit = progress or (lambda _: None)
    n, e = len(dataset), len(suite)
    stages = 1 + e + int(diagnostics)
    state = {"stage": 0, "clean_accuracy": None}

    def batches(rows: np.ndarray, label: str):
        """(positions, rgb, skel, labels) batches of the clips at ``rows``."""
        loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        done = 0
        for step, (rgb, skel, labels) in enumerate(loader):
            if should_stop is not None and should_stop():
                raise EvaluationCancelled(f"stopped during {label} (stage {state['stage'] + 1} of {stages})")
            positions = rows[done:done + len(labels)]
            done += len(labels)
            yield positions, rgb.to(device), skel.to(device), labels.to(device)
            emit({"phase": "evaluate", "stage": state["stage"] + 1, "stages": stages, "attack": label,
                  "step": state["stage"] * 1000 + int(1000 * (step + 1) / max(len(loader), 1)),
                  "steps": stages * 1000, "clean_accuracy": state["clean_accuracy"]})
        state["stage"] += 1

    records = _clean_records(model, suite, ids, batches(np.arange(n), "clean"), state)
    clean_ok = records.clean_correct
    for group in attack_groups(suite, strategy):
        _attack_chains(model, suite, group, strategy, seed, ids, np.flatnonzero(clean_ok), batches, records)
    if diagnostics:
        _unbounded_check(model, suite, seed, ids, np.flatnonzero(clean_ok), batches, records)
    records.meta = {"seed": seed, "strategy": strategy, "diagnostics": diagnostics}
    return records


def attack_groups(suite: Sequence[AttackConfig], strategy: str) -> list[list[list[int]]]:
    """The suite as groups of chains that depend on nothing outside their group: ``full``
    runs each entry on its own; ``worst-case`` cascades within a budget (the R and S
    chains, then RS on what both left standing), so a budget's chains are one group."""
    if strategy != "worst-case":
        return [[[i]] for i in range(len(suite))]
    groups: dict[tuple, list[list[int]]] = {}
    for chain in cascade_order(suite):
        first = suite[chain[0]]
        groups.setdefault((first.eps_rgb, first.eps_skel), []).append(chain)
    return list(groups.values())


def _clean_records(model, suite, ids: np.ndarray, batches, state: dict | None = None) -> ClipRecords:
    """The clean pass over every clip: a table with the clean columns filled and every
    outcome "not attacked" (-1) until attacks fill it."""
    n, e = len(ids), len(suite)
    label = np.zeros(n, dtype=np.int64)
    clean_pred = np.zeros(n, dtype=np.int64)
    grad_zero_rgb = np.zeros(n, dtype=np.int8)
    grad_zero_skel = np.zeros(n, dtype=np.int8)
    unstable = np.zeros(n, dtype=np.int8)
    probabilities = np.zeros(n, dtype=np.int8)
    seen = correct = 0
    state = state if state is not None else {}
    state["clean_accuracy"] = 0.0
    for positions, rgb, skel, labels in batches:
        logits, gz_rgb, gz_skel, flips, probs = _clean_pass(model, rgb, skel, labels)
        label[positions] = labels.cpu().numpy()
        clean_pred[positions] = logits.argmax(1).cpu().numpy()
        grad_zero_rgb[positions], grad_zero_skel[positions] = gz_rgb.numpy(), gz_skel.numpy()
        unstable[positions], probabilities[positions] = flips.numpy(), probs.numpy()
        seen += len(positions)
        correct += int((clean_pred[positions] == label[positions]).sum())
        state["clean_accuracy"] = 100.0 * correct / seen
    return ClipRecords([c.to_dict() for c in suite], np.asarray(ids, dtype=np.int64), label, clean_pred,
                       np.full((n, e), CLEAN_WRONG, dtype=np.int8), np.full((n, e), -1, dtype=np.int32),
                       np.full((n, e), -1, dtype=np.int16), grad_zero_rgb, grad_zero_skel,
                       np.full(n, -1, dtype=np.int8), unstable, probabilities)


def _attack_chains(model, suite, chains: list[list[int]], strategy: str, seed: int, ids: np.ndarray,
                   rows: np.ndarray, batches, records: ClipRecords) -> None:
    """Run ``chains`` (one group of ``attack_groups``) on the clean-correct clips at
    positions ``rows``, writing their outcome, iterate and restart into ``records``."""
    n = len(records.clip)
    attacked = np.zeros(n, dtype=bool)
    attacked[rows] = True
    no_break = np.zeros(n, dtype=bool)
    broken_in: dict[tuple, np.ndarray] = {}  # (budget, mode) -> clips broken so far
    for chain in chains:
        first = suite[chain[0]]
        budget = (first.eps_rgb, first.eps_skel)
        standing = attacked.copy()
        if first.mode == "RS" and strategy == "worst-case":
            standing &= ~broken_in.get((budget, "R"), no_break) & ~broken_in.get((budget, "S"), no_break)
        for index in chain:
            cfg = suite[index]
            records.outcome[attacked & ~standing, index] = SKIPPED
            hit = np.zeros(n, dtype=bool)
            for positions, rgb, skel, labels in batches(np.flatnonzero(standing), cfg.label):
                result = run_attack(model, rgb, skel, labels, cfg, seed=seed, clip_ids=ids[positions].tolist())
                broke = result.broken.cpu().numpy()
                records.outcome[positions, index] = broke.astype(np.int8)
                records.iterate[positions, index] = result.iterate.cpu().numpy()
                records.restart[positions, index] = result.restart.cpu().numpy()
                hit[positions[broke]] = True
            key = (budget, cfg.mode)
            broken_in[key] = broken_in.get(key, no_break) | hit
            if strategy == "worst-case":
                standing &= ~hit


def _unbounded_check(model, suite, seed: int, ids: np.ndarray, rows: np.ndarray, batches,
                     records: ClipRecords) -> None:
    check = AttackConfig(**{**UNBOUNDED.to_dict(),
                            "perturb_absent_bodies": bool(suite and suite[0].perturb_absent_bodies)})
    for positions, rgb, skel, labels in batches(rows, "unbounded check"):
        result = run_attack(model, rgb, skel, labels, check, seed=seed, clip_ids=ids[positions].tolist())
        records.unbounded[positions] = result.broken.cpu().numpy().astype(np.int8)


# ------------------------------------------------------------------------------ in units
#
# A sharded evaluation runs the same computation as ``run_records`` cut into units that any
# worker can take: first the clean pass (``clean_records``), then one unit per (group of
# ``attack_groups``, batch of the clean-correct clips) and, with diagnostics, one unbounded
# check per batch (``plan_units``, ``run_unit``); ``apply_unit`` writes a unit's result into
# the clean table. Under strategy ``full`` every unit is exactly a batch the unsharded run
# attacks (same clips, same order), so the tables are identical; under ``worst-case`` the
# survivors of a cascade are re-batched within the unit rather than across the set, which
# can only change rounding.

UNBOUNDED_GROUP = -1


def _plain_batches(dataset, batch_size: int, should_stop, device, num_workers: int = 0):
    device = resolve_device(device)

    def batches(rows: np.ndarray, label: str):
        loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        done = 0
        for rgb, skel, labels in loader:
            if should_stop is not None and should_stop():
                raise EvaluationCancelled(f"stopped during {label}")
            positions = rows[done:done + len(labels)]
            done += len(labels)
            yield positions, rgb.to(device), skel.to(device), labels.to(device)
    return batches


def clean_records(model, dataset, suite: Sequence[AttackConfig], *, batch_size: int = 16, device: str | None = None,
                  clip_ids: Sequence[int] | None = None, should_stop: Callable[[], bool] | None = None,
                  num_workers: int = 0) -> ClipRecords:
    """The clean pass of ``run_records`` alone (the first stage of a sharded evaluation)."""
    model = model.to(resolve_device(device)).eval()
    ids = np.asarray(list(clip_ids) if clip_ids is not None else clip_identities(dataset), dtype=np.int64)
    batches = _plain_batches(dataset, batch_size, should_stop, device, num_workers)
    return _clean_records(model, suite, ids, batches(np.arange(len(dataset)), "clean"))


def plan_units(records: ClipRecords, suite: Sequence[AttackConfig], strategy: str, diagnostics: bool,
               batch_size: int, max_units: int | None = None) -> list[tuple[int, list[int]]]:
    """The units after the clean pass ``records``: (group index, or ``UNBOUNDED_GROUP``,
    positions of consecutive clean-correct clips). A unit is one batch, or as many whole
    consecutive batches as keep the plan within ``max_units`` (a large suite at batch size
    1 over a large test set would otherwise make millions of units); whole batches in
    order keep each batch exactly the one the unsharded run attacks."""
    rows = np.flatnonzero(records.clean_correct)
    groups = list(range(len(attack_groups(suite, strategy)))) + ([UNBOUNDED_GROUP] if diagnostics else [])
    batches = -(-len(rows) // batch_size)
    per_unit = 1 if not max_units else max(1, -(-len(groups) * batches // max_units))
    size = batch_size * per_unit
    chunks = [rows[i:i + size].tolist() for i in range(0, len(rows), size)]
    return [(g, chunk) for g in groups for chunk in chunks]


def run_unit(model, dataset, suite: Sequence[AttackConfig], unit: tuple[int, list[int]], *, strategy: str,
             seed: int, clip_ids: Sequence[int], batch_size: int = 16, device: str | None = None,
             should_stop: Callable[[], bool] | None = None, num_workers: int = 0) -> dict[str, np.ndarray]:
    """One unit of ``plan_units`` on ``dataset`` (every clip of the evaluation, in order):
    arrays to pass to ``apply_unit``."""
    group, rows = unit
    suite = list(suite)
    model = model.to(resolve_device(device)).eval()
    ids = np.asarray(list(clip_ids), dtype=np.int64)
    positions = np.asarray(rows, dtype=np.int64)
    batches = _plain_batches(dataset, batch_size, should_stop, device, num_workers)
    n, e = len(ids), len(suite)
    table = ClipRecords([c.to_dict() for c in suite], ids, np.zeros(n, np.int64), np.zeros(n, np.int64),
                        np.full((n, e), CLEAN_WRONG, np.int8), np.full((n, e), -1, np.int32),
                        np.full((n, e), -1, np.int16), np.zeros(n, np.int8), np.zeros(n, np.int8),
                        np.full(n, -1, np.int8), np.zeros(n, np.int8), np.zeros(n, np.int8))
    if group == UNBOUNDED_GROUP:
        _unbounded_check(model, suite, seed, ids, positions, batches, table)
        return {"group": np.array(group), "rows": positions, "unbounded": table.unbounded[positions]}
    chains = attack_groups(suite, strategy)[group]
    _attack_chains(model, suite, chains, strategy, seed, ids, positions, batches, table)
    entries = np.asarray(sorted(i for chain in chains for i in chain), dtype=np.int64)
    return {"group": np.array(group), "rows": positions, "entries": entries,
            "outcome": table.outcome[np.ix_(positions, entries)], "iterate": table.iterate[np.ix_(positions, entries)],
            "restart": table.restart[np.ix_(positions, entries)]}


def apply_unit(records: ClipRecords, unit: dict[str, np.ndarray]) -> None:
    """Write the result of a unit (``run_unit``) into the clean table ``records``."""
    rows = np.asarray(unit["rows"], dtype=np.int64)
    if int(unit["group"]) == UNBOUNDED_GROUP:
        records.unbounded[rows] = unit["unbounded"]
        return
    where = np.ix_(rows, np.asarray(unit["entries"], dtype=np.int64))
    records.outcome[where] = unit["outcome"]
    records.iterate[where] = unit["iterate"]
    records.restart[where] = unit["restart"]


def evaluate(model, meta: dict[str, Any], dataset, suite: list[AttackConfig], *, batch_size: int = 16,
             seed: int = 0, strategy: str = "full", diagnostics: bool = True,
             progress: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
             device: str | None = None, dataset_info: dict[str, Any] | None = None,
             model_info: dict[str, Any] | None = None, num_workers: int = 0) -> tuple[dict[str, Any], ClipRecords]:
    """Run the suite and aggregate: returns ``(report, records)``; the report
    (``robustact.report/v2``) is derived from the records alone (plus identity fields).
    ``num_workers``: DataLoader processes loading clips (see ``run_records``).

    A dataset that scales skeletons with other constants than the checkpoint's
    ``normalisation`` is refused (open a cache with ``ClipDataset(...,
    normalisation=meta["normalisation"])``): the model would see other inputs than it was
    trained on, and ε_S would have another physical size."""
    from .report import build_report

    check_normalisation(dataset, meta)
    t0 = time.perf_counter()
    records = run_records(model, dataset, suite, batch_size=batch_size, seed=seed, strategy=strategy,
                          diagnostics=diagnostics, device=device, progress=progress, should_stop=should_stop,
                          num_workers=num_workers)
    amr = model.amr_weights() if hasattr(model, "amr_weights") else []
    report = build_report(records, meta, dataset_info=dataset_info, model_info=model_info, amr_weights=amr,
                          config={"batch_size": batch_size, "device": str(resolve_device(device))},
                          seconds=time.perf_counter() - t0)
    return report, records
