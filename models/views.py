"""Views of robustness reports: the paper's figures and tables as JSON, and one
self-contained HTML page with inline SVG figures (no scripts, no external fetches).

* ``robustness_curves`` — accuracy vs ε per attack label and mode ✗R/✗S/✗RS, with the clean
  (✓RS) accuracy line (Figure 2);
* ``modal_table``       — Table 1 layout: one row per attack, ✓RS ✗R ✗S ✗RS Avg, plus
  Unimodal ✓R / ✓S from reports whose ``model.arch`` is ``rgb`` / ``skeleton``;
* ``defence_table``     — Table 2 layout with Avg, RI against a baseline and the overall
  worst case WC (``models.report.compare``);
* ``amr_weights``       — mean of W_R and W_s per AMR (Table 3) and per-channel means
  (Figure 4);
* ``worst_case``        — per ``robustact.report/v2`` report and budget, the worst case
  over the suite per mode ✗R/✗S/✗RS, Avg and overall (not in the paper);
* ``diagnostics``       — the gradient-masking checks of v2 reports and their flags.

``build_views`` bundles them as one ``robustact.views/v1`` document, ``render_html``
draws it (with a warning banner when a report's diagnostics raised a flag). Accuracies are
percentages and budgets are in 1/255 units, as in the paper. v1 reports have no worst case
and no diagnostics. Pure Python: the SVG is written by hand.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Sequence

from robustact.models.report import MODES, WORST_CASE, ReportError, average, compare, report_name, table_row

VIEWS_SCHEMA = "robustact.views/v1"
MODE_HEADERS = {"R": "✗R", "S": "✗S", "RS": "✗RS"}
UNIMODAL_ARCHS = {"rgb": "R", "skeleton": "S"}
MODAL_COLUMNS = ["✓RS", "✗R", "✗S", "✗RS", "Avg", "Unimodal ✓R", "Unimodal ✓S"]
WORST_CASE_COLUMNS = ["✓RS", "✗R", "✗S", "✗RS", "Avg", "Overall"]
# Row keys of the comparison columns (models.report.COLUMNS).
COLUMN_KEYS = {"✓RS": "clean", "✗R": "R", "✗S": "S", "✗RS": "RS", "Avg": "avg", "RI": "ri", "WC": "wc"}

Reports = Sequence[dict[str, Any]]


def _names(reports: Reports, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [report_name(r) for r in reports]
    if len(names) != len(reports):
        raise ReportError(f"{len(names)} names for {len(reports)} reports")
    return list(names)


def _eps255(entry: dict[str, Any], key: str = "eps_rgb") -> float:
    """An attack entry's budget in 1/255 units (8/255 when the entry does not say)."""
    return round(float(entry.get(key, 8 / 255)) * 255, 3)


def _arch(report: dict[str, Any]) -> str:
    return str((report.get("model") or {}).get("arch") or "fusion")


def _dataset_key(report: dict[str, Any]) -> str | None:
    dataset = report.get("dataset") or {}
    key = dataset.get("name") or dataset.get("cache")
    return None if key is None else str(key)


def _accuracy(entry: dict[str, Any], mode: str) -> float | None:
    """None when the mode was not run, or (v2) its column is incomplete (worst-case cascade)."""
    result = entry["modes"].get(mode)
    return None if result is None or result.get("accuracy") is None else float(result["accuracy"])


def attack_labels(reports: Reports) -> list[str]:
    """Attack labels in the order they first appear."""
    labels: list[str] = []
    for report in reports:
        for entry in report["attacks"]:
            if entry["label"] not in labels:
                labels.append(entry["label"])
    return labels


def default_attack(reports: Reports, preferred: str = "PGD20") -> str | None:
    """``preferred`` when some report has it, else the first label found (None if none)."""
    labels = attack_labels(reports)
    if any(label.lower() == preferred.lower() for label in labels):
        return preferred
    return labels[0] if labels else None


# --------------------------------------------------------------------------- JSON views


def robustness_curves(reports: Reports, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Figure 2: one panel per report and attack label; each panel has the clean accuracy
    and, per mode, the points (ε in 1/255 units, accuracy) sorted by ε. Mode ✗S is placed
    at the skeleton budget, ✗R and ✗RS at the RGB budget."""
    panels = []
    for report, name in zip(reports, _names(reports, names)):
        by_label: dict[str, dict[str, dict[float, float]]] = {}
        for entry in report["attacks"]:
            series = by_label.setdefault(entry["label"], {m: {} for m in MODES})
            for mode in MODES:
                acc = _accuracy(entry, mode)
                eps = _eps255(entry, "eps_skel" if mode == "S" else "eps_rgb")
                if acc is not None and eps not in series[mode]:  # first entry per budget wins
                    series[mode][eps] = acc
        for label, series in by_label.items():
            if not any(series.values()):  # every column incomplete (a worst-case cascade)
                continue
            panels.append({
                "report": name, "attack": label, "clean": float(report["clean"]["accuracy"]),
                "series": {m: [{"eps": e, "accuracy": a} for e, a in sorted(points.items())]
                           for m, points in series.items() if points},
            })
    return {"x": "eps (1/255)", "y": "accuracy (%)", "panels": panels}


def modal_table(reports: Reports, eps: float | None = None, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Table 1: for each multimodal report, one row per attack (and budget) with ✓RS, ✗R,
    ✗S, ✗RS and Avg; Unimodal ✓R / ✓S are the clean accuracies of the reports whose
    ``model.arch`` is ``rgb`` / ``skeleton`` (same dataset when the reports name one).
    ``eps`` (1/255 units) keeps only that budget; the paper's Table 1 uses 6."""
    names = _names(reports, names)
    unimodal = [(UNIMODAL_ARCHS[_arch(r)], _dataset_key(r), float(r["clean"]["accuracy"]), n)
                for r, n in zip(reports, names) if _arch(r) in UNIMODAL_ARCHS]

    def unimodal_accuracy(modality: str, dataset: str | None) -> tuple[float | None, str | None]:
        for mod, key, acc, name in unimodal:
            if mod == modality and (key is None or dataset is None or key == dataset):
                return acc, name
        return None, None

    groups = []
    for report, name in zip(reports, names):
        if _arch(report) in UNIMODAL_ARCHS:
            continue
        dataset = _dataset_key(report)
        uni_r, uni_r_name = unimodal_accuracy("R", dataset)
        uni_s, uni_s_name = unimodal_accuracy("S", dataset)
        clean = float(report["clean"]["accuracy"])
        rows = []
        for entry in report["attacks"]:
            if eps is not None and _eps255(entry) != round(eps, 3):
                continue
            accs = {m: _accuracy(entry, m) for m in MODES}
            avg = average(*accs.values()) if None not in accs.values() else None
            rows.append({"attack": entry["label"], "eps": _eps255(entry), "clean": clean, **accs, "avg": avg,
                         "unimodal_R": uni_r, "unimodal_S": uni_s})
        groups.append({"report": name, "dataset": dataset, "clean": clean, "unimodal_R": uni_r,
                       "unimodal_S": uni_s, "unimodal_reports": {"R": uni_r_name, "S": uni_s_name}, "rows": rows})
    return {"eps": eps, "columns": MODAL_COLUMNS, "groups": groups}


def _default_baseline(reports: Reports, names: list[str]) -> int:
    """The undefended multimodal model: ``model.defence == "none"``, else a row named None."""
    for i, report in enumerate(reports):
        model = report.get("model") or {}
        if model.get("defence") == "none" and _arch(report) not in UNIMODAL_ARCHS:
            return i
    return names.index("None") if "None" in names else 0


def _baseline_index(reports: Reports, names: list[str], baseline: int | str | None) -> int:
    if baseline is None:
        return _default_baseline(reports, names)
    if isinstance(baseline, str):
        if baseline not in names:
            raise ReportError(f"baseline {baseline!r} is not one of {names}")
        return names.index(baseline)
    if not 0 <= baseline < len(reports):
        raise ReportError(f"baseline index {baseline} out of range 0..{len(reports) - 1}")
    return baseline


def defence_table(reports: Reports, baseline: int | str | None = None, attack: str | None = "PGD20",
                  eps: float | None = None, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Table 2 (``robustact.comparison/v1``) with Avg and RI against ``baseline`` (an index
    into ``reports`` or a row name; default: the undefended model, else the first).

    ``attack`` is a label or ``worst-case`` (the per-mode worst case of v2 reports). Every
    row has WC, the overall worst case at its budget (None for v1 reports). Reports without
    all three complete modes of ``attack`` (a worst-case cascade leaves per-attack columns
    incomplete) are left out and listed under ``skipped`` with the reason; it is an error
    when the baseline is one of them. ``attack=None`` picks PGD20 when present, else the
    first label found."""
    names = _names(reports, names)
    attack = attack or default_attack(reports)
    if attack is None:
        raise ReportError("no report has any attack results")
    base_index = _baseline_index(reports, names, baseline)
    kept, skipped = [], []
    for i, report in enumerate(reports):
        try:
            table_row(report, attack, eps)
        except ReportError as e:
            if i == base_index:
                raise ReportError(f"baseline {names[i]!r}: {e}") from None
            reason = str(e).removeprefix(f"{report_name(report)}: ")
            skipped.append({"name": names[i], "reason": reason})
        else:
            kept.append(i)
    table = compare([reports[i] for i in kept], baseline=kept.index(base_index), attack=attack, eps=eps,
                    names=[names[i] for i in kept])
    table["skipped"] = skipped
    return table


def amr_weights(report: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Table 3 (mean of W_R and W_s per AMR) and Figure 4 (per-channel means)."""
    amrs = []
    for entry in report.get("amr_weights") or []:
        ch_rgb = [float(v) for v in entry.get("channel_mean_rgb") or []]
        ch_skel = [float(v) for v in entry.get("channel_mean_skel") or []]
        mean_rgb = entry.get("mean_rgb", sum(ch_rgb) / len(ch_rgb) if ch_rgb else None)
        mean_skel = entry.get("mean_skel", sum(ch_skel) / len(ch_skel) if ch_skel else None)
        amrs.append({"index": entry.get("index", len(amrs) + 1), "layer_rgb": entry.get("layer_rgb"),
                     "layer_skel": entry.get("layer_skel"), "mean_rgb": mean_rgb, "mean_skel": mean_skel,
                     "channel_mean_rgb": ch_rgb, "channel_mean_skel": ch_skel})
    return {"report": name or report_name(report), "amrs": amrs}


def worst_case(reports: Reports, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per ``robustact.report/v2`` report, one row per budget of its ``worst_case`` section:
    ✗R/✗S/✗RS (None for a mode not in the suite), Avg (all three modes), overall and the
    attacks the budget ran. Reports without the section (v1) are listed under ``without``."""
    groups, without = [], []
    for report, name in zip(reports, _names(reports, names)):
        entries = report.get("worst_case") or []
        if not entries:
            without.append(name)
            continue
        rows = []
        for entry in entries:
            modes = entry.get("modes") or {}
            accs = {m: None if m not in modes else float(modes[m]["accuracy"]) for m in MODES}
            rows.append({"eps": _eps255(entry), "eps_skel": _eps255(entry, "eps_skel"),
                         "attacks": [str(a) for a in entry.get("attacks") or []], **accs,
                         "avg": average(*accs.values()) if None not in accs.values() else None,
                         "overall": float(entry["overall"]["accuracy"])})
        rows.sort(key=lambda r: (r["eps"], r["eps_skel"]))
        groups.append({"report": name, "strategy": (report.get("config") or {}).get("strategy") or "full",
                       "clean": float(report["clean"]["accuracy"]), "rows": rows})
    return {"columns": WORST_CASE_COLUMNS, "groups": groups, "without": without}


# The diagnostics' flag names (``check``) per summary field.
_DIAGNOSTIC_CHECKS = {"zero_gradient_rgb": "zero_gradient", "zero_gradient_skel": "zero_gradient",
                      "unbounded": "unbounded", "black_box_clips": "black_box", "monotonic_eps": "monotonic_eps",
                      "monotonic_steps": "monotonic_steps", "unstable_clips": "randomised_outputs",
                      "probabilities": "softmax_outputs"}


def diagnostics(reports: Reports, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The gradient-masking checks of each v2 report in one row (zero-gradient shares,
    unbounded-attack accuracy, Square-only breaks, monotonicity violations, unstable or
    probability outputs) and every flag raised, named by report. Reports without a
    ``diagnostics`` section (v1) are listed under ``without``."""
    rows, flags, without = [], [], []
    for report, name in zip(reports, _names(reports, names)):
        diag = report.get("diagnostics")
        if not isinstance(diag, dict):
            without.append(name)
            continue
        own = [{"report": name, "check": str(f.get("check", "")), "message": str(f.get("message", ""))}
               for f in diag.get("flags") or []]
        flags.extend(own)
        zero = diag.get("zero_gradient") or {}
        unbounded = diag.get("unbounded") or {}
        black = diag.get("black_box") or []
        worst_black = max(black, key=lambda b: (b["percent"], b["clips"]), default=None)
        rows.append({
            "report": name, "flags": len(own), "checks_flagged": sorted({f["check"] for f in own}),
            "zero_gradient_rgb": zero.get("rgb"), "zero_gradient_skel": zero.get("skel"),
            "unbounded": unbounded.get("accuracy"), "unbounded_threshold": unbounded.get("threshold"),
            "black_box_cells": len(black),
            "black_box_clips": None if worst_black is None else int(worst_black["clips"]),
            "black_box_percent": None if worst_black is None else float(worst_black["percent"]),
            "monotonic_eps": len(diag.get("monotonic_eps") or []),
            "monotonic_steps": len(diag.get("monotonic_steps") or []),
            "unstable_clips": diag.get("unstable_clips"),
            "probabilities": diag.get("outputs_look_like_probabilities"),
        })
    return {"rows": rows, "flags": flags, "without": without}


def build_views(reports: Reports, baseline: int | str | None = None, attack: str | None = "PGD20",
                eps: float | None = None, names: Sequence[str] | None = None) -> dict[str, Any]:
    """All views of ``reports`` in one ``robustact.views/v1`` document. A defence table
    that cannot be built (no report has the attack, or the baseline's columns are
    incomplete) is ``{"error": …}`` rather than fatal, so a single report always has a page."""
    if not reports:
        raise ReportError("the views need at least one report")
    names = _names(reports, names)
    attack = attack or default_attack(reports)
    base_index = _baseline_index(reports, names, baseline)  # a bad baseline is the caller's error
    try:
        defences = defence_table(reports, base_index, attack, eps, names)
    except ReportError as e:
        defences = {"error": str(e), "attack": attack}
    return {
        "schema": VIEWS_SCHEMA,
        "reports": names,
        "robustness_curves": robustness_curves(reports, names),
        "modal_table": modal_table(reports, names=names),
        "defence_table": defences,
        "amr_weights": [v for v in (amr_weights(r, n) for r, n in zip(reports, names)) if v["amrs"]],
        "worst_case": worst_case(reports, names),
        "diagnostics": diagnostics(reports, names),
    }


# --------------------------------------------------------------------------- SVG

COLOURS = {"R": "#d62728", "S": "#1f77b4", "RS": "#7b3fb5", "clean": "#444444"}
SERIES_LABELS = {"R": "✗R (RGB attacked)", "S": "✗S (skeleton attacked)", "RS": "✗RS (both attacked)"}


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, value = [], first
    while value < hi + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-9 else "0"


def line_chart(figure: str, title: str, series: list[dict[str, Any]], x_label: str, y_label: str,
               y_range: tuple[float, float] | None = None, x_range: tuple[float, float] | None = None,
               hlines: Sequence[dict[str, Any]] = (), width: int = 520, height: int = 300) -> str:
    """An ``<svg data-figure=…>`` line chart: axes, ticks, grid, a legend on the right.

    ``series``: ``[{"label", "colour", "points": [(x, y), …]}]``; ``hlines``: horizontal
    reference lines ``{"label", "colour", "y"}`` drawn dashed across the plot."""
    left, right, top, bottom = 54, 178, 30, 46
    pw, ph = width - left - right, height - top - bottom
    xs = [x for s in series for x, _ in s["points"]]
    ys = [y for s in series for _, y in s["points"]] + [h["y"] for h in hlines]
    x_lo, x_hi = x_range or (min(xs, default=0.0), max(xs, default=1.0))
    x_ticks = nice_ticks(x_lo, x_hi)
    y_lo, y_hi = y_range or (min(0.0, min(ys, default=0.0)), max(ys, default=1.0))
    y_ticks = nice_ticks(y_lo, y_hi)
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y_lo) / (y_hi - y_lo) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" data-figure="{escape(figure)}" role="img" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f"<title>{escape(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left + pw / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">'
           f"{escape(title)}</text>"]
    for t in y_ticks:  # grid + y ticks
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>')
        out.append(f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end">{escape(_fmt(t))}</text>')
    for t in x_ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{escape(_fmt(t))}</text>')
    out.append(f'<path d="M{left},{top} V{top + ph} H{left + pw}" fill="none" stroke="#333" class="axes"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2:.1f})">{escape(y_label)}</text>')

    legend: list[tuple[str, str, bool]] = []
    for h in hlines:
        y = sy(h["y"])
        out.append(f'<line class="reference" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                   f'stroke="{h["colour"]}" stroke-width="1.5" stroke-dasharray="6 4"/>')
        legend.append((f'{h["label"]} {h["y"]:.2f}', h["colour"], True))
    for s in series:
        points = sorted(s["points"])
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{s["colour"]}" '
                   f'stroke-width="2" stroke-linejoin="round"><title>{escape(s["label"])}</title></polyline>')
        if len(points) <= 40:
            for x, y in points:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s["colour"]}">'
                           f"<title>{escape(s['label'])}: {_fmt(x)} → {y:.2f}</title></circle>")
        legend.append((s["label"], s["colour"], False))
    lx = left + pw + 14
    for i, (label, colour, dashed) in enumerate(legend):
        y = top + 8 + i * 18
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 22}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 28}" y="{y + 4}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def svg_document(svg: str) -> str:
    """An inline ``<svg>`` of this module as a standalone ``.svg`` file."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + svg + "\n"


def curves_figure(panel: dict[str, Any], figure: str) -> str:
    series = [{"label": SERIES_LABELS[m], "colour": COLOURS[m],
               "points": [(p["eps"], p["accuracy"]) for p in points]}
              for m, points in panel["series"].items()]
    x_hi = max([p[0] for s in series for p in s["points"]] + [1.0])
    return line_chart(figure, f"{panel['report']} — {panel['attack']}", series, "ε (×1/255)", "accuracy (%)",
                      y_range=(0, 100), x_range=(0, x_hi),
                      hlines=[{"label": "clean ✓RS", "colour": COLOURS["clean"], "y": panel["clean"]}])


def amr_figure(report: str, amr: dict[str, Any], figure: str) -> str:
    series = [{"label": f"W_R ({len(amr['channel_mean_rgb'])} ch)", "colour": COLOURS["R"],
               "points": list(enumerate(amr["channel_mean_rgb"]))},
              {"label": f"W_s ({len(amr['channel_mean_skel'])} ch)", "colour": COLOURS["S"],
               "points": list(enumerate(amr["channel_mean_skel"]))}]
    series = [s for s in series if s["points"]]
    values = [y for s in series for _, y in s["points"]]
    y_hi = max(values + [1.0]) if max(values, default=0) > 0.5 else max(values + [0.5])
    return line_chart(figure, f"{report} — AMR {amr['index']}", series, "channel", "mean weight",
                      y_range=(min(0.0, min(values, default=0.0)), y_hi))


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-bottom: 6px; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.figures svg { border: 1px solid #ddd; background: #fff; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child, td[rowspan] + td { text-align: left; }
td[rowspan] { vertical-align: top; }
table.modal th:nth-child(2) { text-align: left; }
thead th { border-bottom: 2px solid #999; }
td.best { font-weight: bold; }
td.flagged { background: #fde2e1; }
.note { color: #666; font-size: 13px; }
.banner { border: 1px solid #d9a400; background: #fff6d6; padding: 6px 14px; margin: 12px 0; }
.banner ul { margin: 6px 0; padding-left: 20px; }
"""


def _cell(value: float | None, digits: int = 2, best: bool = False) -> str:
    text = "–" if value is None else f"{value:.{digits}f}"
    return f'<td class="best">{text}</td>' if best else f"<td>{text}</td>"


def _text_cell(text: str, flagged: bool = False) -> str:
    return f'<td class="flagged">{escape(text)}</td>' if flagged else f"<td>{escape(text)}</td>"


def _table(head: Sequence[str], rows: list[str], css_class: str = "") -> str:
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="{css_class}"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _curves_html(view: dict[str, Any]) -> str:
    panels = view["panels"]
    if not panels:
        return '<p class="note">No attack results.</p>'
    figures = [curves_figure(p, f"curves-{i}") for i, p in enumerate(panels)]
    single = all(len(points) <= 1 for p in panels for points in p["series"].values())
    note = ('<p class="note">Each report holds one budget per attack, so the curves are single points; '
            "evaluate with several ε (e.g. <code>--eps 2,4,6,8</code>) to draw Figure 2.</p>") if single else ""
    return note + f'<div class="figures">{"".join(figures)}</div>'


def _modal_html(view: dict[str, Any]) -> str:
    if not view["groups"]:
        return '<p class="note">No multimodal (fusion) report.</p>'
    rows = []
    for group in view["groups"]:
        counts: dict[str, int] = {}
        for row in group["rows"]:
            counts[row["attack"]] = counts.get(row["attack"], 0) + 1
        title = group["report"] + (f" ({group['dataset']})" if group["dataset"] else "")
        span = max(len(group["rows"]), 1)
        first = f'<td rowspan="{span}">{escape(title)}</td>'
        if not group["rows"]:
            rows.append(f"<tr>{first}<td>–</td>" + _cell(group["clean"]) + "<td>–</td>" * 4
                        + _cell(group["unimodal_R"]) + _cell(group["unimodal_S"]) + "</tr>")
        for i, row in enumerate(group["rows"]):
            label = row["attack"] + (f" ε={_fmt(row['eps'])}/255" if counts[row["attack"]] > 1 else "")
            rows.append(f"<tr>{first if i == 0 else ''}<td>{escape(label)}</td>" + "".join(
                _cell(row[k]) for k in ("clean", "R", "S", "RS", "avg", "unimodal_R", "unimodal_S")) + "</tr>")
    note = ""
    if any(row[m] is None for group in view["groups"] for row in group["rows"] for m in MODES):
        note = ('<p class="note">–: mode not in the suite, or its column is incomplete (a worst-case cascade '
                "attacks only the clips still standing; see the worst case).</p>")
    return _table(["Model", "Attack", *view["columns"]], rows, "modal") + note


def _defence_html(view: dict[str, Any]) -> str:
    if "error" in view:
        return f'<p class="note">{escape(view["error"])}</p>'
    keys = [COLUMN_KEYS[c] for c in view["columns"]]
    best = {k: max((r.get(k) for r in view["rows"] if r.get(k) is not None), default=None) for k in keys}
    rows = [f"<tr><td>{escape(r['name'])}</td>" + "".join(
        _cell(r.get(k), best=len(view["rows"]) > 1 and r.get(k) is not None and r.get(k) == best[k]) for k in keys)
        + "</tr>" for r in view["rows"]]
    budgets = sorted({r["eps_used"] for r in view["rows"]})
    eps = f", ε = {' / '.join(_fmt(b) for b in budgets)} (×1/255)"
    wc = ""
    if "wc" in keys:
        wc = (" WC: overall worst case at the row's budget (clean-correct and broken by no attack of any mode "
              "of the suite); – for reports without one (v1).")
    per_mode = " ✗R/✗S/✗RS: worst case per mode over the suite." if view["attack"].lower() == WORST_CASE else ""
    html = (f'<p class="note">{escape(view["attack"])}{escape(eps)}; RI against '
            f"<strong>{escape(view['baseline'])}</strong>. Best value per column in bold.{escape(per_mode + wc)}</p>"
            + _table(["Defence", *view["columns"]], rows))
    if view.get("skipped"):
        items = "".join(f"<li>{escape(s['name'])}: {escape(s['reason'])}</li>" for s in view["skipped"])
        html += f'<p class="note">Left out:</p><ul class="note">{items}</ul>'
    return html


def _amr_html(views: list[dict[str, Any]]) -> str:
    if not views:
        return '<p class="note">No report holds AMR weights (only models trained with defence amr do).</p>'
    parts = []
    for k, view in enumerate(views):
        head = ["", *(f"AMR {a['index']}" for a in view["amrs"])]
        rows = [f"<tr><td>Mean value of {label}</td>" + "".join(_cell(a[key], 4) for a in view["amrs"]) + "</tr>"
                for label, key in (("W_R", "mean_rgb"), ("W_s", "mean_skel"))]
        layers = "; ".join(f"AMR {a['index']}: {a['layer_rgb']} / {a['layer_skel']}" for a in view["amrs"])
        figures = [amr_figure(view["report"], a, f"amr-{k}-{a['index']}") for a in view["amrs"]
                   if a["channel_mean_rgb"] or a["channel_mean_skel"]]
        parts.append(f"<h3>{escape(view['report'])}</h3>" + _table(head, rows)
                     + f'<p class="note">Layers (RGB / skeleton): {escape(layers)}</p>'
                     + f'<div class="figures">{"".join(figures)}</div>')
    return "".join(parts)


def _eps_label(row: dict[str, Any]) -> str:
    if row["eps_skel"] == row["eps"]:
        return _fmt(row["eps"])
    return f"{_fmt(row['eps'])} RGB / {_fmt(row['eps_skel'])} skeleton"


def _worst_case_html(view: dict[str, Any] | None) -> str:
    if not view or not view["groups"]:
        return '<p class="note">No report has a worst-case section (robustact.report/v1 reports have none).</p>'
    rows = []
    for group in view["groups"]:
        cascade = " (worst-case cascade)" if group["strategy"] == WORST_CASE else ""
        first = f'<td rowspan="{len(group["rows"])}">{escape(group["report"] + cascade)}</td>'
        for i, row in enumerate(group["rows"]):
            rows.append(f"<tr>{first if i == 0 else ''}<td>{escape(_eps_label(row))}</td>"
                        + "".join(_cell(v) for v in (group["clean"], row["R"], row["S"], row["RS"], row["avg"]))
                        + _cell(row["overall"]) + f"<td>{escape(', '.join(row['attacks']))}</td></tr>")
    html = ('<p class="note">Per clip, over every attack of the budget: a clip counts as robust only if it is '
            "correct on clean input and no attack broke it. ✗RS also counts clips broken by an R-only or S-only "
            "attack (such a perturbation is an RS perturbation too); Overall: broken by no attack of any mode. "
            "–: mode not in the suite.</p>"
            + _table(["Model", "ε (×1/255)", *view["columns"], "Attacks"], rows, "modal worst-case"))
    if view["without"]:
        html += f'<p class="note">No worst case (v1 reports): {escape(", ".join(view["without"]))}.</p>'
    return html


def _banner_html(view: dict[str, Any] | None) -> str:
    if not view or not view["flags"]:
        return ""
    items = "".join(f"<li><strong>{escape(f['report'])}</strong> [{escape(f['check'])}]: {escape(f['message'])}</li>"
                    for f in view["flags"])
    return (f'<div class="banner" id="diagnostics-warning" role="alert"><strong>Warning: the diagnostics of '
            f'{len({f["report"] for f in view["flags"]})} report(s) raised {len(view["flags"])} flag(s); their '
            f'robust accuracies may be overestimated (gradient masking?).</strong> '
            f'See <a href="#diagnostics">Diagnostics</a>.<ul>{items}</ul></div>')


def _diagnostics_html(view: dict[str, Any] | None) -> str:
    if not view or not view["rows"]:
        return '<p class="note">No report holds diagnostics (robustact.report/v1 reports have none).</p>'

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    rows = []
    for r in view["rows"]:
        flagged = set(r["checks_flagged"])

        def cell(field: str, text: str) -> str:  # shaded when its check raised a flag and it is not nil
            return _text_cell(text, _DIAGNOSTIC_CHECKS[field] in flagged and bool(r[field]))

        black = "–" if r["black_box_clips"] is None else (
            f"{r['black_box_clips']} ({r['black_box_percent']:.2f}%)")
        probs = "–" if r["probabilities"] is None else ("yes" if r["probabilities"] else "no")
        rows.append(f"<tr><td>{escape(r['report'])}</td>" + _text_cell(str(r["flags"]), bool(r["flags"]))
                    + cell("zero_gradient_rgb", pct(r["zero_gradient_rgb"]))
                    + cell("zero_gradient_skel", pct(r["zero_gradient_skel"]))
                    + cell("unbounded", "–" if r["unbounded"] is None else f"{r['unbounded']:.2f}")
                    + cell("black_box_clips", black)
                    + cell("monotonic_eps", str(r["monotonic_eps"])) + cell("monotonic_steps", str(r["monotonic_steps"]))
                    + cell("unstable_clips", "–" if r["unstable_clips"] is None else str(r["unstable_clips"]))
                    + cell("probabilities", probs) + "</tr>")
    head = ["Report", "Flags", "Zero grad. RGB %", "Zero grad. skeleton %", "Unbounded acc. %",
            "Square-only breaks", "Non-monotone in ε", "Non-monotone in steps", "Unstable clips", "Probabilities"]
    html = (_table(head, rows, "diagnostics")
            + '<p class="note">Zero grad.: clean-correct clips whose CE gradient w.r.t. that modality is exactly '
              "zero (flagged when any). Unbounded: accuracy under PGD50 with ε = 1 on both modalities (flagged "
              "above 1%). Square-only breaks: clips the score-based Square attack broke and no gradient attack "
              "of the same budget and mode did, worst budget × mode (flagged above 0.2%). Non-monotone: accuracy "
              "rising with ε or with steps. Unstable: two identical passes gave different logits. Probabilities: "
              "the outputs look like softmax, not logits. Flagged cells are shaded.</p>")
    if view["without"]:
        html += f'<p class="note">No diagnostics (v1 reports): {escape(", ".join(view["without"]))}.</p>'
    return html


def render_html(reports: Reports, baseline: int | str | None = None, attack: str | None = "PGD20",
                title: str = "robustact report", eps: float | None = None,
                names: Sequence[str] | None = None) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched) with
    Figure 2, Tables 1–3 and Figure 4 for ``reports``."""
    return views_html(build_views(reports, baseline=baseline, attack=attack, eps=eps, names=names), title)


def plain_table_html(note: str, head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A note and a table of text and numbers (2 decimals for floats, – for None)."""
    def cell(v: Any) -> str:
        return _cell(v) if isinstance(v, float) or v is None else _text_cell(str(v))

    return f'<p class="note">{escape(note)}</p>' + _table(head, ["<tr>" + "".join(cell(v) for v in r) + "</tr>"
                                                                 for r in rows])


def views_html(views: dict[str, Any], title: str = "robustact report",
               extra_tables: Sequence[tuple[str, str, dict[str, Any]]] = (),
               extra_sections: Sequence[tuple[str, str, str]] = ()) -> str:
    """The page of a ``build_views`` document. ``extra_tables`` appends further
    Table-2-layout sections ``(id, heading, defence_table view)`` (e.g. Tables 4 and 5);
    ``extra_sections`` sections ``(id, heading, html)`` of HTML built here (e.g.
    ``plain_table_html``). A document without ``worst_case`` / ``diagnostics`` (built by
    hand) gets notes there."""
    listed = ", ".join(views["reports"])
    extra = "".join(f'<section id="{escape(sid)}">\n<h2>{escape(heading)}</h2>\n{_defence_html(view)}\n</section>\n'
                    for sid, heading, view in extra_tables)
    extra += "".join(f'<section id="{escape(sid)}">\n<h2>{escape(heading)}</h2>\n{html}\n</section>\n'
                     for sid, heading, html in extra_sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="generator" content="robustact {VIEWS_SCHEMA}">
<title>{escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{escape(title)}</h1>
{_banner_html(views.get("diagnostics"))}
<p class="note">{len(views["reports"])} report(s): {escape(listed)}. Accuracies in %, budgets ε in units of 1/255.</p>
<section id="robustness-curves">
<h2>Robustness curves (Figure 2)</h2>
{_curves_html(views["robustness_curves"])}
</section>
<section id="modal-table">
<h2>Modal robustness (Table 1)</h2>
{_modal_html(views["modal_table"])}
</section>
<section id="defence-table">
<h2>Defence comparison (Table 2)</h2>
{_defence_html(views["defence_table"])}
</section>
<section id="amr-weights">
<h2>AMR weights (Table 3, Figure 4)</h2>
{_amr_html(views["amr_weights"])}
</section>
<section id="worst-case">
<h2>Worst case</h2>
{_worst_case_html(views.get("worst_case"))}
</section>
<section id="diagnostics">
<h2>Diagnostics</h2>
{_diagnostics_html(views.get("diagnostics"))}
</section>
{extra}</body>
</html>
"""
