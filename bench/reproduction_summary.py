"""Summarise one or more `robustact reproduce` folders (seeds, layouts) with error bars.

    python bench/reproduction_summary.py OUT [OUT ...] [--eps 8] [--json FILE]

For every model of the reports in ``OUT/reports/``: clean accuracy, the worst case per
mode (✗R, ✗S, ✗RS: a clip counts as robust only if it is right on clean input and no attack
of the budget fooled it) at ``--eps``, their average and RI against the undefended model
(eq. 14, worst case in place of one attack), and the AMR weight means. With several folders
of the same plan (seeds) each cell is the mean ± the standard error over seeds; with one it
is the value ± the binomial standard error sqrt(p(1 − p)/n) of its n test clips, which is
the error bar of a single run's sampling of clips, not of training.

Prints Markdown; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

MODES = ("R", "S", "RS")


def _worst(report: dict, eps: float) -> dict | None:
    for w in report.get("worst_case") or []:
        if abs(w["eps_rgb"] * 255 - eps) < 1e-6:
            return w
    return None


def model_numbers(report: dict, eps: float) -> dict:
    worst = _worst(report, eps)
    out = {"clean": report["clean"]["accuracy"], "n": report["dataset"]["num_samples"]}
    for m in MODES:
        out[m] = worst["modes"][m]["accuracy"] if worst and m in worst["modes"] else None
    arch = report["model"].get("arch", "fusion")
    if arch != "fusion":  # a unimodal model: only an attack on its own modality means anything
        for m in MODES:
            if m != {"rgb": "R", "skeleton": "S"}[arch]:
                out[m] = None
    values = [out[m] for m in MODES]
    out["avg"] = sum(values) / 3 if None not in values else None
    weights = report.get("amr_weights") or []
    if weights:
        out["w_rgb"] = sum(w["mean_rgb"] for w in weights) / len(weights)
        out["w_skel"] = sum(w["mean_skel"] for w in weights) / len(weights)
    return out


def load_run(out: Path, eps: float) -> tuple[dict, dict[str, dict]]:
    from robustact.models.reproduce import ReproducePlan

    plan = json.loads((out / "plan.json").read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.items() if k != "schema"}
    models = {}
    for spec in ReproducePlan(**fields).models():  # the plan's order: None, unimodal, baselines, AT, AMR, ablations
        path = out / "reports" / f"{spec.key}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            models[spec.key] = {"name": report["model"]["name"], **model_numbers(report, eps)}
    base = models.get("none")
    for numbers in models.values():
        if base and numbers["avg"] is not None and base["avg"] is not None:
            numbers["ri"] = (numbers["clean"] + numbers["avg"]) - (base["clean"] + base["avg"])
    return plan, models


def _binomial_se(p: float, n: int) -> float:
    q = p / 100
    return 100 * math.sqrt(max(q * (1 - q), 0.0) / n)


def combine(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per model and column: mean and standard error over runs (binomial for one run)."""
    out: dict[str, dict] = {}
    for key in runs[0]:
        rows = [r[key] for r in runs if key in r]
        cell = {"name": rows[0]["name"], "seeds": len(rows)}
        for col in ("clean", *MODES, "avg", "ri", "w_rgb", "w_skel"):
            values = [r.get(col) for r in rows]
            if any(v is None for v in values):
                cell[col] = None
                continue
            mean = sum(values) / len(values)
            if len(values) > 1:
                se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
            elif col in ("clean", *MODES):
                se = _binomial_se(mean, rows[0]["n"])
            else:
                se = None
            cell[col] = (mean, se)
        out[key] = cell
    return out


def _fmt(cell, digits: int = 1) -> str:
    if cell is None:
        return "–"
    mean, se = cell
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def markdown(table: dict[str, dict], title: str) -> str:
    lines = [f"**{title}**", "", "| Model | clean | ✗R | ✗S | ✗RS | Avg | RI | W̄ RGB | W̄ skel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in table.values():
        lines.append(f"| {cell['name']} | {_fmt(cell['clean'])} | {_fmt(cell['R'])} | {_fmt(cell['S'])} | "
                     f"{_fmt(cell['RS'])} | {_fmt(cell['avg'])} | {_fmt(cell['ri'])} | {_fmt(cell.get('w_rgb'), 3)} | "
                     f"{_fmt(cell.get('w_skel'), 3)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path)
    parser.add_argument("--eps", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    groups: dict[str, list] = {}
    for out in args.outs:
        plan, models = load_run(out, args.eps)
        key = json.dumps({k: v for k, v in plan.items() if k != "seed"}, sort_keys=True)
        groups.setdefault(key, []).append((plan, models))
    result = []
    for runs in groups.values():
        plan = runs[0][0]
        seeds = sorted(p["seed"] for p, _ in runs)
        table = combine([m for _, m in runs])
        title = (f"{plan.get('layout', 'ntu')} layout, {plan['classes']} classes, seeds {seeds}: worst case over "
                 f"{plan['pgd_steps'] and 'PGD' + str(plan['pgd_steps'])} + CW{plan['cw_steps']} at ε = {args.eps:g}/255, "
                 f"{runs[0][1]['none']['n']} test clips")
        print(markdown(table, title) + "\n")
        result.append({"plan": plan, "seeds": seeds, "models": table})
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
