"""Robustness reports (schema ``robustact.report/v1``), the paper's metrics and comparisons.

Accuracies are percentages (0-100), as in the paper's tables.

* Avg (eq. 13) = (✗R + ✗S + ✗RS) / 3
* RI (eq. 14)  = (✓RS_m + Avg_m) − (✓RS_n + Avg_n), n the baseline (usually "None").

The schema is documented in ``docs/REPORT.md``; ``validate_report`` checks the parts that
``compare`` relies on so that a hand-written report (e.g. the paper's own numbers) works too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_SCHEMA = "robustact.report/v1"
COMPARISON_SCHEMA = "robustact.comparison/v1"
MODES = ("R", "S", "RS")
COLUMNS = ("✓RS", "✗R", "✗S", "✗RS", "Avg", "RI")


class ReportError(ValueError):
    """A report is not a valid ``robustact.report/v1`` document."""


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
    if report.get("schema") != REPORT_SCHEMA:
        raise ReportError(f"{source}: schema is {report.get('schema')!r}, expected {REPORT_SCHEMA!r}")
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
            if mode not in MODES or not isinstance(result, dict) or not isinstance(result.get("accuracy"), (int, float)):
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
        raise ReportError(f"{report_name(report)}: no {label} results (has {', '.join(have) or 'none'})")
    return matches[0]


def table_row(report: dict[str, Any], label: str, eps: float | None = None) -> dict[str, float]:
    entry = find_attack(report, label, eps)
    missing = [m for m in MODES if m not in entry["modes"]]
    if missing:
        raise ReportError(f"{report_name(report)}: {label} lacks mode(s) {', '.join(missing)}")
    r, s, rs = (float(entry["modes"][m]["accuracy"]) for m in MODES)
    return {"clean": float(report["clean"]["accuracy"]), "R": r, "S": s, "RS": rs, "avg": average(r, s, rs)}


def compare(reports: list[dict[str, Any]], baseline: int | str = 0, attack: str = "PGD20",
            eps: float | None = None, names: list[str] | None = None) -> dict[str, Any]:
    """Table-2-style comparison: one row per report, RI against ``baseline``.

    ``baseline`` is an index into ``reports`` or a row name.
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
    base = rows[base_index]
    out_rows = []
    for name, row in zip(names, rows):
        ri = relative_improvement(row["clean"], row["avg"], base["clean"], base["avg"])
        out_rows.append({"name": name, **row, "ri": ri})
    return {"schema": COMPARISON_SCHEMA, "attack": attack, "eps": eps, "baseline": names[base_index],
            "columns": list(COLUMNS), "rows": out_rows}


def format_comparison(comparison: dict[str, Any]) -> str:
    """Plain-text Table-2 layout, two decimals like the paper."""
    rows = comparison["rows"]
    width = max([len("Defence")] + [len(r["name"]) for r in rows])
    head = f"{'Defence':<{width}}  " + "  ".join(f"{c:>7}" for c in comparison["columns"])
    lines = [f"{comparison['attack']} — RI against {comparison['baseline']}", head, "-" * len(head)]
    for r in rows:
        cells = (r["clean"], r["R"], r["S"], r["RS"], r["avg"], r["ri"])
        lines.append(f"{r['name']:<{width}}  " + "  ".join(f"{v:7.2f}" for v in cells))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Human summary of one report: clean accuracy and each attack per mode, with Avg."""
    lines = [f"{report_name(report)}: clean (✓RS) {report['clean']['accuracy']:.2f}%"
             f" on {report.get('dataset', {}).get('num_samples', '?')} clips"]
    lines.append(f"{'attack':<8} {'eps':>7}  " + "  ".join(f"{c:>7}" for c in ("✗R", "✗S", "✗RS", "Avg")))
    for a in report["attacks"]:
        accs = [a["modes"].get(m, {}).get("accuracy") for m in MODES]
        cells = ["      -" if v is None else f"{v:7.2f}" for v in accs]
        avg = f"{average(*accs):7.2f}" if None not in accs else "      -"
        eps = f"{a.get('eps_rgb', 0) * 255:.0f}/255"
        lines.append(f"{a['label']:<8} {eps:>7}  " + "  ".join(cells + [avg]))
    return "\n".join(lines)
