"""Summarise one or more `robustact reproduce` folders (seeds, layouts) with error bars.

    python bench/reproduction_summary.py OUT [OUT ...] [--eps 8] [--json FILE] [--training]
        [--diff amr:amr-frozen ...]

For every model of the reports in ``OUT/reports/``: clean accuracy, the worst case per
mode (✗R, ✗S, ✗RS: a clip counts as robust only if it is right on clean input and no attack
of the budget fooled it) at ``--eps``, their average and RI against the undefended model
(eq. 14, worst case in place of one attack), and the AMR weight means. Where the folder has
AutoAttack reports (``reproduce``'s autoattack stage): ✗RS under AutoAttack and "✗RS all",
clip by clip under the suite and AutoAttack together (the number to quote). With several folders
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
AA_COLUMNS = ("RS_aa", "RS_all")  # ✗RS under AutoAttack; under the suite and AutoAttack, clip by clip


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
    from robustact.models.reproduce import ReproducePlan, autoattack_numbers

    plan = json.loads((out / "plan.json").read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.items() if k != "schema"}
    models = {}
    for spec in ReproducePlan(**fields).models():  # the plan's order: None, unimodal, baselines, AT, AMR, ablations
        path = out / "reports" / f"{spec.key}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            models[spec.key] = {"name": report["model"]["name"], **model_numbers(report, eps)}
            aa = autoattack_numbers(out, spec.key, eps)
            if aa:
                models[spec.key].update(RS_aa=aa["autoattack_RS"], RS_all=aa["worst_of_all_RS"])
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
    for key in dict.fromkeys(k for r in runs for k in r):  # every model of any run, the first run's first
        rows = [r[key] for r in runs if key in r]
        cell = {"name": rows[0]["name"], "seeds": len(rows)}
        for col in ("clean", *MODES, *AA_COLUMNS, "avg", "ri", "w_rgb", "w_skel"):
            values = [r.get(col) for r in rows]
            if any(v is None for v in values):
                cell[col] = None
                continue
            mean = sum(values) / len(values)
            if len(values) > 1:
                se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
            elif col in ("clean", *MODES, *AA_COLUMNS):
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
    """One row per model; a ``seeds`` column when the rows rest on different numbers of runs
    (a `reproduce --models` subset over extra seeds), since their ± then differ in kind."""
    counts = {cell["seeds"] for cell in table.values()}
    seeds = len(counts) > 1
    aa = any(cell.get("RS_all") is not None for cell in table.values())
    lines = [f"**{title}**", "", "| Model |" + (" seeds |" if seeds else "") + " clean | ✗R | ✗S | ✗RS |" +
             (" ✗RS AA | ✗RS all |" if aa else "") + " Avg | RI | W̄ RGB | W̄ skel |",
             "|---|" + ("---:|" if seeds else "") + "---:|" * (8 + 2 * aa)]
    for cell in table.values():
        lines.append(f"| {cell['name']} |" + (f" {cell['seeds']} |" if seeds else "") +
                     f" {_fmt(cell['clean'])} | {_fmt(cell['R'])} | {_fmt(cell['S'])} | {_fmt(cell['RS'])} |" +
                     (f" {_fmt(cell.get('RS_aa'))} | {_fmt(cell.get('RS_all'))} |" if aa else "") +
                     f" {_fmt(cell['avg'])} | {_fmt(cell['ri'])} | {_fmt(cell.get('w_rgb'), 3)} | "
                     f"{_fmt(cell.get('w_skel'), 3)} |")
    return "\n".join(lines)


def training_table(out: Path, plan: dict) -> str:
    """Has each model converged? Its training accuracy averaged over the last five epochs
    against the five before, from the checkpoint's history: a model still climbing wants
    more epochs. AT-R/S/RS count it on their adversarial batches, the AMR models on the
    clean batches of eq. 12's natural term (``models.train.training_loss``)."""
    from robustact.models.reproduce import ReproducePlan

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.items() if k != "schema"}
    lines = [f"**Training accuracy, {out}** (mean over epochs; on adversarial batches for AT-R/S/RS, on clean ones for AMR)", "",
             "| Model | epochs | first 5 | 5 before the last 5 | last 5 | change |", "|---|---:|---:|---:|---:|---:|"]
    for spec in ReproducePlan(**fields).models():
        path = out / "runs" / spec.key / "model" / "config.json"
        if not path.is_file():
            continue
        acc = [e["train_accuracy"] for e in json.loads(path.read_text())["history"]]
        if len(acc) < 10:
            continue
        first, before, last = (sum(a) / len(a) for a in (acc[:5], acc[-10:-5], acc[-5:]))
        lines.append(f"| {spec.name} | {len(acc)} | {first:.1f} | {before:.1f} | {last:.1f} | {last - before:+.1f} |")
    return "\n".join(lines)


def paired(runs: list[dict[str, dict]], a: str, b: str) -> dict[str, tuple | None]:
    """Model ``a`` minus model ``b`` seed by seed (the same set, split and attacks), mean ±
    standard error of the differences: the seed-to-seed spread shared by both rows cancels."""
    both = [r for r in runs if a in r and b in r]
    out: dict[str, tuple | None] = {"seeds": len(both)}
    for col in ("clean", *MODES, "RS_all", "avg", "ri"):
        diffs = [r[a][col] - r[b][col] for r in both if r[a].get(col) is not None and r[b].get(col) is not None]
        if len(diffs) < 2:
            out[col] = None
            continue
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        out[col] = (mean, se, diffs)
    return out


def paired_markdown(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["**Paired differences over seeds** (mean ± SE; per seed in brackets)", "",
             "| A − B | seeds | clean | ✗R | ✗S | ✗RS | ✗RS all | Avg | RI |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b, d in rows:
        cells = ["–" if d[c] is None else f"{d[c][0]:+.1f} ± {d[c][1]:.1f} [{', '.join(f'{x:+.1f}' for x in d[c][2])}]"
                 for c in ("clean", *MODES, "RS_all", "avg", "ri")]
        lines.append(f"| {a} − {b} | {d['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path)
    parser.add_argument("--eps", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--diff", action="append", default=[], metavar="A:B",
                        help="model keys A and B: A − B seed by seed, e.g. amr:amr-frozen (repeatable)")
    parser.add_argument("--training", action="store_true",
                        help="also print each model's training accuracy over its first and last epochs")
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
                 f"{next(iter(runs[0][1].values()))['n']} test clips per run")
        print(markdown(table, title) + "\n")
        result.append({"plan": plan, "seeds": seeds, "models": table})
        if args.diff:
            pairs = [tuple(d.split(":", 1)) for d in args.diff]
            diffs = [(a, b, paired([m for _, m in runs], a, b)) for a, b in pairs]
            print(paired_markdown(diffs) + "\n")
            result[-1]["paired"] = [{"a": a, "b": b, **d} for a, b, d in diffs]
    if args.training:
        for out in args.outs:
            print(training_table(out, json.loads((out / "plan.json").read_text())) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
