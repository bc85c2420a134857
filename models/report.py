"""Robustness reports (schema ``robustact.report/v2``; v1 is still read), the paper's
metrics and comparisons.

Accuracies are percentages (0-100), as in the paper's tables. A v2 report is an aggregate of
an evaluation's per-clip table (``models.evaluate.ClipRecords``), built by ``build_report``:
per-attack accuracy, worst case per budget (per mode and overall), per class, and the
gradient-masking diagnostics.

* Avg (eq. 13) = (✗R + ✗S + ✗RS) / 3
* RI (eq. 14)  = (✓RS_m + Avg_m) − (✓RS_n + Avg_n), n the baseline (usually "None").

The schema is documented in ``docs/REPORT.md``; ``validate_report`` checks the parts that
``compare`` relies on so that a hand-written report (e.g. the paper's own numbers) works too.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import GRADIENT_ATTACKS, AttackConfig

REPORT_SCHEMA = "robustact.report/v2"
READABLE_SCHEMAS = ("robustact.report/v1", REPORT_SCHEMA)
COMPARISON_SCHEMA = "robustact.comparison/v1"
MODES = ("R", "S", "RS")
COLUMNS = ("✓RS", "✗R", "✗S", "✗RS", "Avg", "RI", "WC")
WORST_CASE = "worst-case"


class ReportError(ValueError):
    """A report is not a valid ``robustact.report/v1`` or ``/v2`` document."""


def average(r: float, s: float, rs: float) -> float:
    """Eq. 13."""
    return (r + s + rs) / 3.0


def relative_improvement(clean_m: float, avg_m: float, clean_n: float, avg_n: float) -> float:
    """Eq. 14."""
    return (clean_m + avg_m) - (clean_n + avg_n)


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: invalid JSON ({e})") from None
    validate_report(report, source=str(path))
    report.setdefault("_source", str(path))
    return report


def validate_report(report: Any, source: str = "report") -> None:
    if not isinstance(report, dict):
        raise ReportError(f"{source}: a report is a JSON object")
    if report.get("schema") not in READABLE_SCHEMAS:
        raise ReportError(f"{source}: schema is {report.get('schema')!r}, expected one of {READABLE_SCHEMAS}")
    clean = report.get("clean")
    if not isinstance(clean, dict) or not isinstance(clean.get("accuracy"), (int, float)):
        raise ReportError(f"{source}: clean.accuracy missing")
    attacks = report.get("attacks")
    if not isinstance(attacks, list):
        raise ReportError(f"{source}: attacks must be a list")
    for i, a in enumerate(attacks):
        if not isinstance(a, dict) or not isinstance(a.get("label"), str) or not isinstance(a.get("modes"), dict):
            raise ReportError(f"{source}: attacks[{i}] needs a label and modes")
        for mode, result in a["modes"].items():
            # v2: null when a worst-case cascade left the column incomplete.
            if mode not in MODES or not isinstance(result, dict) or not (
                    isinstance(result.get("accuracy"), (int, float))
                    or (result.get("accuracy") is None and report["schema"] != READABLE_SCHEMAS[0])):
                raise ReportError(f"{source}: attacks[{i}].modes.{mode} needs an accuracy")


def report_name(report: dict[str, Any]) -> str:
    model = report.get("model") or {}
    return str(model.get("name") or report.get("_source") or "report")


def _eps_key(a: dict[str, Any]) -> tuple:
    return (round(float(a.get("eps_rgb", 8 / 255)) * 255, 3), round(float(a.get("eps_skel", 8 / 255)) * 255, 3))


def find_attack(report: dict[str, Any], label: str, eps: float | None = None) -> dict[str, Any]:
    """The attack entry with this label (case-insensitive), and budget ``eps``·255 if given."""
    matches = [a for a in report["attacks"] if a["label"].lower() == label.lower()]
    if eps is not None:
        matches = [a for a in matches if _eps_key(a) == (round(eps, 3), round(eps, 3))]
    if not matches:
        have = sorted({a["label"] for a in report["attacks"]})
        if eps is not None and any(a["label"].lower() == label.lower() for a in report["attacks"]):
            at = sorted({_eps_key(a)[0] for a in report["attacks"] if a["label"].lower() == label.lower()})
            raise ReportError(f"{report_name(report)}: no {label} results at ε = {eps:g}/255 (has "
                              f"{', '.join(f'{e:g}' for e in at)} /255)")
        raise ReportError(f"{report_name(report)}: no {label} results (has {', '.join(have) or 'none'})")
    budgets = sorted({_eps_key(a) for a in matches})
    if len(budgets) > 1:  # only without eps: never pick one silently (an RI could mix budgets)
        raise ReportError(f"{report_name(report)}: {label} was run at several budgets "
                          f"({', '.join(f'{b[0]:g}' for b in budgets)} /255); pick one with eps")
    return matches[0]


def worst_case_entry(report: dict[str, Any], eps: float | None = None) -> dict[str, Any] | None:
    """The ``worst_case`` section at budget ``eps``·255 (the only one when not given); None
    for a v1 report. Several budgets and no ``eps`` is an error naming them."""
    entries = report.get("worst_case")
    if not entries:
        return None
    if eps is not None:
        matches = [w for w in entries if _eps_key(w) == (round(eps, 3), round(eps, 3))]
        return matches[0] if matches else None
    if len(entries) > 1:
        have = ", ".join(f"{_eps_key(w)[0]:g}" for w in entries)
        raise ReportError(f"{report_name(report)}: worst case at several budgets ({have} /255); pick one with eps")
    return entries[0]


def table_row(report: dict[str, Any], label: str, eps: float | None = None) -> dict[str, Any]:
    """``{"clean", "R", "S", "RS", "avg", "wc", "eps_used"}`` for attack ``label`` (or
    ``worst-case``: the per-mode worst case over the whole suite). ``wc`` is the overall
    worst case at the same budget (None for v1 reports); ``eps_used`` the budget read, in
    1/255 units. Several budgets and no ``eps`` is an error naming them."""
    clean = float(report["clean"]["accuracy"])
    if label.lower() == WORST_CASE:
        entry = worst_case_entry(report, eps)
        if entry is None:
            raise ReportError(f"{report_name(report)}: no worst-case section"
                              + (f" at ε = {eps:g}/255" if eps is not None else " (a robustact.report/v1 report)"))
        modes = entry["modes"]
        missing = [m for m in MODES if m not in modes]
        if missing:
            raise ReportError(f"{report_name(report)}: worst case lacks mode(s) {', '.join(missing)}")
        r, s, rs = (float(modes[m]["accuracy"]) for m in MODES)
        return {"clean": clean, "R": r, "S": s, "RS": rs, "avg": average(r, s, rs),
                "wc": float(entry["overall"]["accuracy"]), "eps_used": _eps_key(entry)[0]}
    entry = find_attack(report, label, eps)
    missing = [m for m in MODES if m not in entry["modes"]]
    if missing:
        raise ReportError(f"{report_name(report)}: {label} lacks mode(s) {', '.join(missing)}")
    if any(entry["modes"][m].get("accuracy") is None for m in MODES):
        raise ReportError(f"{report_name(report)}: {label} was run in a worst-case cascade, so its per-attack "
                          f"accuracy is unknown; compare with attack {WORST_CASE!r}")
    r, s, rs = (float(entry["modes"][m]["accuracy"]) for m in MODES)
    wc = None
    if report.get("worst_case"):
        same = [w for w in report["worst_case"] if _eps_key(w) == _eps_key(entry)]
        wc = float(same[0]["overall"]["accuracy"]) if same else None
    return {"clean": clean, "R": r, "S": s, "RS": rs, "avg": average(r, s, rs), "wc": wc, "eps_used": _eps_key(entry)[0]}


def compare(reports: list[dict[str, Any]], baseline: int | str = 0, attack: str = "PGD20",
            eps: float | None = None, names: list[str] | None = None) -> dict[str, Any]:
    """Table-2-style comparison: one row per report, RI against ``baseline``, and the
    overall worst case (WC) where the reports have one.

    ``baseline`` is an index into ``reports`` or a row name. ``attack`` is a label (PGD20)
    or ``worst-case``.
    """
    if not reports:
        raise ReportError("compare needs at least one report")
    names = list(names) if names else [report_name(r) for r in reports]
    if isinstance(baseline, str):
        if baseline not in names:
            raise ReportError(f"baseline {baseline!r} is not one of {names}")
        base_index = names.index(baseline)
    else:
        if not 0 <= baseline < len(reports):
            raise ReportError(f"baseline index {baseline} out of range 0..{len(reports) - 1}")
        base_index = baseline
    rows = [table_row(r, attack, eps) for r in reports]
    budgets = sorted({row["eps_used"] for row in rows})
    if len(budgets) > 1:
        used = ", ".join(f"{n}: {row['eps_used']:g}" for n, row in zip(names, rows))
        raise ReportError(f"the reports hold {attack} at different budgets ({used} /255); an RI across budgets means "
                          "nothing: pick one with eps")
    base = rows[base_index]
    out_rows = []
    for name, row in zip(names, rows):
        ri = relative_improvement(row["clean"], row["avg"], base["clean"], base["avg"])
        out_rows.append({"name": name, **row, "ri": ri})
    return {"schema": COMPARISON_SCHEMA, "attack": attack, "eps": eps, "eps_used": budgets[0],
            "baseline": names[base_index], "columns": list(COLUMNS), "rows": out_rows,
            "warnings": comparison_warnings(reports, names, attack, eps)}


def _setting(report: dict[str, Any], attack: str, eps: float | None) -> dict[str, Any]:
    """What a comparison assumes equal across reports, as this report has it."""
    data = report.get("dataset") or {}
    out = {"dataset": data.get("id") or data.get("name") or data.get("cache"), "protocol": data.get("protocol"),
           "split": data.get("split")}
    if attack.lower() != WORST_CASE:
        entry = find_attack(report, attack, eps)
        out["α"] = (round(float(entry.get("alpha_rgb", 0)) * 255, 3), round(float(entry.get("alpha_skel", 0)) * 255, 3))
        out["random start"] = entry.get("random_start")
        out["restarts"] = entry.get("restarts", 1)
    return out


def comparison_warnings(reports: list[dict[str, Any]], names: list[str], attack: str,
                        eps: float | None) -> list[str]:
    """One line per setting that differs between the compared reports: the attack's step
    size, random start or restarts, the dataset, protocol or split."""
    settings = [_setting(r, attack, eps) for r in reports]
    warnings = []
    for key in settings[0]:
        values = [s[key] for s in settings]
        if len({json.dumps(v) for v in values}) > 1:
            shown = ", ".join(f"{n}: {_shown(v)}" for n, v in zip(names, values))
            warnings.append(f"{key} differs between the reports ({shown}); their rows are not measured alike")
    return warnings


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(f"{v:g}" for v in value) + "/255"
    return str(value)


def format_comparison(comparison: dict[str, Any]) -> str:
    """Plain-text Table-2 layout, two decimals like the paper."""
    rows = comparison["rows"]
    width = max([len("Defence")] + [len(r["name"]) for r in rows])
    head = f"{'Defence':<{width}}  " + "  ".join(f"{c:>7}" for c in comparison["columns"])
    budget = comparison.get("eps_used")
    at = f" at ε = {budget:g}/255" if budget is not None else ""
    lines = [f"{comparison['attack']}{at} — RI against {comparison['baseline']}", head, "-" * len(head)]
    for r in rows:
        cells = (r["clean"], r["R"], r["S"], r["RS"], r["avg"], r["ri"], r.get("wc"))
        lines.append(f"{r['name']:<{width}}  " + "  ".join("      -" if v is None else f"{v:7.2f}" for v in cells))
    if any(r.get("wc") is not None for r in rows):
        lines.append("WC: overall worst case per clip over the whole suite at this budget (robust only if no "
                     "attack of any mode broke the clip).")
    lines += [f"warning: {w}" for w in comparison.get("warnings") or []]
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Human summary of one report: clean accuracy, each attack per mode with Avg, the worst
    case and the diagnostics' warnings."""
    lines = [f"{report_name(report)}: clean (✓RS) {report['clean']['accuracy']:.2f}%"
             f" on {report.get('dataset', {}).get('num_samples', '?')} clips"]
    lines.append(f"{'attack':<12} {'eps':>7}  " + "  ".join(f"{c:>7}" for c in ("✗R", "✗S", "✗RS", "Avg")))

    def row(label: str, eps: str, accs: list[float | None]) -> str:
        cells = ["      -" if v is None else f"{v:7.2f}" for v in accs]
        avg = f"{average(*accs):7.2f}" if None not in accs else "      -"
        return f"{label:<12} {eps:>7}  " + "  ".join(cells + [avg])

    for a in report["attacks"]:
        lines.append(row(a["label"], f"{a.get('eps_rgb', 0) * 255:g}/255",
                         [a["modes"].get(m, {}).get("accuracy") for m in MODES]))
    for w in report.get("worst_case") or []:
        lines.append(row("worst case", f"{w['eps_rgb'] * 255:g}/255",
                         [w["modes"].get(m, {}).get("accuracy") for m in MODES])
                     + f"   overall {w['overall']['accuracy']:.2f}")
    for w in report.get("worst_case") or []:
        if w.get("eps_skel_metres"):
            x, y, z = (1000 * v for v in w["eps_skel_metres"])
            lines.append(f"ε_S = {w['eps_skel'] * 255:g}/255 moves a joint by at most {x:.1f} / {y:.1f} / {z:.1f} mm "
                         "along x / y / z (the model's skeleton scaling)")
        elif w.get("eps_skel_pixels"):
            x, y = w["eps_skel_pixels"]
            lines.append(f"ε_S = {w['eps_skel'] * 255:g}/255 moves a keypoint by at most {x:.2f} / {y:.2f} pixels "
                         "along x / y of the source video (the model's skeleton scaling)")
    if (report.get("config") or {}).get("strategy") == "worst-case":
        lines.append("(worst-case cascade: per-attack columns shown as - are incomplete by design)")
    for flag in (report.get("diagnostics") or {}).get("flags", []):
        lines.append(f"WARNING [{flag['check']}]: {flag['message']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ v2 from records
# Outcome codes of models.evaluate.ClipRecords (kept here so reading a report needs no torch).
_BROKEN, _SKIPPED = 1, -2
# A Square success on more than this share of clips that no white-box attack broke is
# flagged (AutoAttack's check uses 0.2 %); an unbounded attack leaving more than this share
# of clips correct is flagged.
BLACK_BOX_THRESHOLD = 0.2
UNBOUNDED_THRESHOLD = 1.0


def _accuracy(robust: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    n = len(labels)
    totals = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[robust], minlength=num_classes)
    per_class = [100.0 * h / t if t else None for h, t in zip(hits.tolist(), totals.tolist())]
    return {"accuracy": 100.0 * int(robust.sum()) / n if n else 0.0, "per_class": per_class}


def _key_without(cfg: dict[str, Any], *names: str) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in names}, sort_keys=True)


def eps_skel_units(eps_skel: float, meta: dict[str, Any]) -> dict[str, list[float]]:
    """ε_S in the skeleton's own units per axis: a coordinate in [0, 1] spans the
    checkpoint's (skel_max − skel_min) on its axis. ``{"eps_skel_metres": [x, y, z]}`` for 3-D
    Kinect skeletons, ``{"eps_skel_pixels": [x, y]}`` for 2-D pose (OpenPose keypoints are
    in pixels of the source video); ``{"eps_skel_metres": None}`` without normalisation."""
    norm = meta.get("normalisation")
    if not norm:
        return {"eps_skel_metres": None}
    values = [round(float(eps_skel) * (float(hi) - float(lo)), 6) for lo, hi in zip(norm["skel_min"], norm["skel_max"])]
    return {"eps_skel_metres" if len(values) == 3 else "eps_skel_pixels": values}


def build_report(records, meta: dict[str, Any], *, dataset_info: dict[str, Any] | None = None,
                 model_info: dict[str, Any] | None = None, amr_weights: list | None = None,
                 config: dict[str, Any] | None = None, seconds: float | None = None) -> dict[str, Any]:
    """A ``robustact.report/v2`` document from per-clip ``records`` (every accuracy in it is
    computed here, from the records) and the checkpoint's ``meta``."""
    suite = records.suite
    labels = np.asarray(records.label, dtype=np.int64)
    num_classes = len(meta["class_names"])
    clean_ok = records.clean_pred == labels
    outcome = records.outcome
    broken = outcome == _BROKEN

    groups: dict[str, dict[str, Any]] = {}
    for e, cfg in enumerate(suite):
        key = _key_without(cfg, "mode")
        if key not in groups:
            label = _label(cfg)
            groups[key] = {"label": label, **{k: v for k, v in cfg.items() if k != "mode"}, "modes": {}}
        complete = not np.any(outcome[:, e] == _SKIPPED)
        acc = _accuracy(clean_ok & ~broken[:, e], labels, num_classes)
        if not complete:
            acc = {"accuracy": None, "per_class": None}
        groups[key]["modes"][cfg["mode"]] = {**acc, "attacked": int(np.isin(outcome[:, e], (0, 1)).sum()),
                                             "broken": int(broken[:, e].sum()), "complete": complete}
    attacks = list(groups.values())
    for entry in attacks:
        entry.update(eps_skel_units(entry["eps_skel"], meta))
        accs = [entry["modes"].get(m, {}).get("accuracy") for m in MODES]
        if None not in accs:
            entry["avg"] = average(*accs)

    worst = []
    budgets: dict[tuple, list[int]] = {}
    for e, cfg in enumerate(suite):
        budgets.setdefault((cfg["eps_rgb"], cfg["eps_skel"]), []).append(e)
    for (eps_rgb, eps_skel), cols in budgets.items():
        modes_present = [m for m in MODES if any(suite[e]["mode"] == m for e in cols)]
        any_broken = broken[:, cols].any(axis=1) if cols else np.zeros(len(labels), bool)
        modes = {}
        for m in modes_present:
            # An R-only or S-only perturbation is also an RS perturbation of the same budget.
            mcols = cols if m == "RS" else [e for e in cols if suite[e]["mode"] == m]
            modes[m] = _accuracy(clean_ok & ~broken[:, mcols].any(axis=1), labels, num_classes)
        worst.append({"eps_rgb": eps_rgb, "eps_skel": eps_skel, **eps_skel_units(eps_skel, meta),
                      "attacks": sorted({_label(suite[e]) for e in cols}), "modes": modes,
                      "overall": _accuracy(clean_ok & ~any_broken, labels, num_classes)})
    if worst and all(set(w["modes"]) == set(MODES) for w in worst):
        for w in worst:
            w["avg"] = average(*(w["modes"][m]["accuracy"] for m in MODES))

    n = len(labels)
    records_meta = dict(records.meta)
    strategy = records_meta.get("strategy", "full")
    model_info = model_info or {}
    report = {
        "schema": REPORT_SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": model_info.get("name") or meta.get("name") or meta.get("train", {}).get("defence", "model"),
            "arch": meta["model"]["arch"], "preset": meta.get("preset"),
            "defence": meta.get("train", {}).get("defence"), "num_amr": meta["model"].get("num_amr", 0),
            "lam": meta.get("train", {}).get("lam"), "weights_sha256": meta.get("weights_sha256"),
            "config": meta["model"], "train": meta.get("train"),
            **{k: v for k, v in model_info.items() if k != "name"},
        },
        "dataset": {"num_samples": n, "class_names": list(meta["class_names"]), **(dataset_info or {})},
        "config": {**(config or {}), "seed": records_meta.get("seed"), "strategy": strategy,
                   "diagnostics": records_meta.get("diagnostics", True), "suite": list(suite),
                   "threat_model": {
                       "norm": "Linf", "box": [0.0, 1.0],
                       "absent_bodies": "perturbed" if suite and suite[0].get("perturb_absent_bodies")
                       else "left at zero (attacks never create a body that the recording lacks)",
                       "robust": "clean-correct and no iterate of any restart of the attack misclassified",
                       "worst_case_rs": "counts R-only and S-only breaks of the same budget"}},
        "clean": _accuracy(clean_ok, labels, num_classes),
        "attacks": attacks,
        "worst_case": worst,
        "diagnostics": diagnostics(records, attacks, worst),
        "amr_weights": amr_weights or [],
        "per_clip": {"format": "robustact.clips/v1", "num_clips": n, "entries": len(suite), "file": None},
        "timing": {"seconds": seconds},
    }
    return report


def _label(cfg: dict[str, Any]) -> str:
    return AttackConfig.from_dict(cfg).label


def diagnostics(records, attacks: list[dict[str, Any]], worst: list[dict[str, Any]]) -> dict[str, Any]:
    """The gradient-masking checks (Carlini et al. 2019; Croce & Hein 2020; Pintor et al.
    2022) that a report can answer from its records. ``flags`` lists what looks wrong."""
    flags: list[dict[str, str]] = []
    labels = np.asarray(records.label)
    n = len(labels)
    clean_ok = records.clean_pred == labels
    attacked = int(clean_ok.sum())
    out: dict[str, Any] = {"flags": flags}

    # 1. Zero input gradients on clean-correct clips.
    zero = {}
    for name, column in (("rgb", records.grad_zero_rgb), ("skel", records.grad_zero_skel)):
        applicable = clean_ok & (column >= 0)
        zero[name] = None if not applicable.any() else 100.0 * float((column[applicable] == 1).sum()) / applicable.sum()
    both = clean_ok & (records.grad_zero_rgb != 0) & (records.grad_zero_skel != 0)
    zero["all"] = 100.0 * float(both.sum()) / attacked if attacked else None
    out["zero_gradient"] = {"unit": "% of clean-correct clips", **zero}
    for name in ("rgb", "skel"):
        if zero[name]:
            flags.append({"check": "zero_gradient", "message": f"{zero[name]:.1f}% of clean-correct clips have an "
                          f"exactly zero CE gradient w.r.t. the {'RGB clip' if name == 'rgb' else 'skeleton'}: "
                          "gradient attacks cannot move them (gradient masking?)"})

    # 2. Unbounded attack (ε = 1, RS) must reach ~0 %.
    ran = records.unbounded >= 0
    if ran.any():
        robust = clean_ok & (records.unbounded == 0)
        acc = 100.0 * float(robust.sum()) / n
        out["unbounded"] = {"attack": "PGD50 from the clean input, RS, ε = 1 (the whole [0, 1] box), α = 0.02", "accuracy": acc,
                            "threshold": UNBOUNDED_THRESHOLD}
        if acc > UNBOUNDED_THRESHOLD:
            flags.append({"check": "unbounded", "message": f"an unbounded attack (ε = 1 on both modalities) leaves "
                          f"{acc:.2f}% accuracy; it should reach ~0%: gradients do not lead anywhere (masking)"})
    else:
        out["unbounded"] = None

    # 3. Accuracy non-increasing in ε (same attack, mode) and in steps (same attack family).
    def series(key_fields: tuple[str, ...], along: str) -> list[dict[str, Any]]:
        violations = []
        by: dict[tuple, list[tuple[float, float, str]]] = {}
        for entry in attacks:
            for mode, result in entry["modes"].items():
                if result.get("accuracy") is None:
                    continue
                key = (mode, _key_without({k: v for k, v in entry.items() if k not in ("label", "modes", "avg")},
                                          *key_fields))
                by.setdefault(key, []).append((float(entry[along]), float(result["accuracy"]), entry["label"]))
        for (mode, _), points in by.items():
            points.sort()
            for (x0, a0, l0), (x1, a1, l1) in zip(points, points[1:]):
                if x1 > x0 and a1 > a0:
                    violations.append({"mode": mode, "from": {along: x0, "attack": l0, "accuracy": a0},
                                       "to": {along: x1, "attack": l1, "accuracy": a1}})
        return violations

    by_eps = series(("eps_rgb", "eps_skel"), "eps_rgb")
    worst_modes: dict[str, list[tuple[float, float]]] = {}
    for w in worst:
        for mode, result in w["modes"].items():
            worst_modes.setdefault(mode, []).append((float(w["eps_rgb"]), float(result["accuracy"])))
    for mode, points in worst_modes.items():
        points.sort()
        for (x0, a0), (x1, a1) in zip(points, points[1:]):
            if x1 > x0 and a1 > a0:
                by_eps.append({"mode": mode, "from": {"eps_rgb": x0, "attack": "worst case", "accuracy": a0},
                               "to": {"eps_rgb": x1, "attack": "worst case", "accuracy": a1}})
    by_steps = series(("steps", "alpha_rgb", "alpha_skel"), "steps")
    out["monotonic_eps"] = by_eps
    out["monotonic_steps"] = by_steps
    for v in by_eps:
        flags.append({"check": "monotonic_eps", "message": f"{v['to']['attack']} ✗{v['mode']}: accuracy rises from "
                      f"{v['from']['accuracy']:.2f}% at ε={v['from']['eps_rgb'] * 255:g}/255 to {v['to']['accuracy']:.2f}% "
                      f"at ε={v['to']['eps_rgb'] * 255:g}/255"})
    for v in by_steps:
        flags.append({"check": "monotonic_steps", "message": f"✗{v['mode']}: {v['to']['attack']} "
                      f"({v['to']['accuracy']:.2f}%) is weaker than {v['from']['attack']} ({v['from']['accuracy']:.2f}%)"})

    # 4. Black-box (Square) must not beat white-box attacks.
    suite = records.suite
    black = []
    cells: dict[tuple, dict[str, list[int]]] = {}
    for e, cfg in enumerate(suite):
        kind = "white" if cfg["name"] in GRADIENT_ATTACKS else "black"
        cells.setdefault((cfg["eps_rgb"], cfg["eps_skel"], cfg["mode"]), {}).setdefault(kind, []).append(e)
    broken = records.outcome == _BROKEN
    for (eps_rgb, eps_skel, mode), kinds in cells.items():
        if "white" in kinds and "black" in kinds:
            only_black = broken[:, kinds["black"]].any(axis=1) & ~broken[:, kinds["white"]].any(axis=1)
            share = 100.0 * float(only_black.sum()) / n if n else 0.0
            black.append({"eps_rgb": eps_rgb, "eps_skel": eps_skel, "mode": mode, "clips": int(only_black.sum()),
                          "percent": share})
            if share > BLACK_BOX_THRESHOLD:
                flags.append({"check": "black_box", "message": f"✗{mode} ε={eps_rgb * 255:g}/255: the score-based "
                              f"Square attack broke {int(only_black.sum())} clip(s) ({share:.2f}%) that no gradient "
                              "attack broke: gradients are misleading (masking?)"})
    out["black_box"] = black

    # 5. Randomised or probability outputs.
    unstable = int((records.unstable == 1).sum())
    out["unstable_clips"] = unstable
    if unstable:
        flags.append({"check": "randomised_outputs", "message": f"{unstable} clip(s) got different logits from two "
                      "identical eval-mode passes: a randomised defence needs EOT attacks"})
    probs = bool(n and (records.probabilities == 1).all())
    out["outputs_look_like_probabilities"] = probs
    if probs:
        flags.append({"check": "softmax_outputs", "message": "the model outputs probabilities, not logits: CE and "
                      "margin losses saturate (use logits)"})
    return out


def write_report(report: dict[str, Any], records, path: str | Path) -> tuple[Path, Path]:
    """Write ``report`` as JSON at ``path`` and its per-clip records beside it
    (``<stem>.clips.npz``); the report names the records file."""
    path = Path(path)
    clips = path.with_name(path.stem + ".clips.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_clips = clips.with_name(clips.name + ".tmp")
    records.save(tmp_clips)
    tmp_clips.replace(clips)
    report["per_clip"]["file"] = clips.name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return path, clips
