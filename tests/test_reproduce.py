"""`robustact reproduce` end to end: the `small` plan through the CLI, then a rerun that
skips every finished stage."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from robustact.models.reproduce import plan_for, table_files
from robustact.service.cli import app

pytestmark = pytest.mark.slow


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"robustact {' '.join(map(str, args))}\n{result.output}"
    return result.output


def test_plans():
    default, small = plan_for("default"), plan_for("small")
    # Issue 11 let the budget grow from 1 to 2 hours on 2 cores so that AT-RS and the ablations
    # converge and every fusion model meets AutoAttack.
    assert default.estimate()["total"] < 3600 * 1.2
    assert [s.kind for s in default.stages()].count("autoattack") == 15  # every fusion model
    assert not any(s.kind == "autoattack" for s in plan_for("default", autoattack=False).stages())
    import dataclasses

    with pytest.raises(ValueError, match="AutoAttack's attacks"):
        dataclasses.replace(default, autoattack=("pgd20",))
    imigue = plan_for("default", layout="imigue")
    assert imigue.num_clips == default.num_clips and (imigue.num_amr, default.num_amr) == (1, 3)  # as the paper
    assert len(imigue.models()) == 17
    assert small.estimate()["total"] < 60
    keys = [s.key for s in default.models()]
    assert len(keys) == len(set(keys)) == 17  # 8 defences + amr-frozen + 2 unimodal + 2 AMR counts + 4 λ
    assert plan_for("small", epochs=3).adv_epochs == 3


def test_reproduce_small(tmp_path):
    out = tmp_path / "repro"
    log = run("reproduce", "--out", out, "--size", "small", "--seed", 0, "--device", "cpu")
    plan = plan_for("small")
    stages = plan.stages()
    assert "estimated time on 2 CPU cores" in log
    assert all(f"[{i:2d}/{len(stages)}]" in log for i in range(1, len(stages) + 1))

    for name in table_files(plan):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for attack in ("fgsm", plan.pgd, plan.cw):
        assert (out / f"figure2-{attack}.svg").read_text().count("<polyline") == 3  # ✗R ✗S ✗RS
    for i in range(1, plan.num_amr + 1):
        assert "<svg" in (out / f"figure4-amr{i}.svg").read_text()
    assert len(list((out / "reports").glob("*.json"))) == len(plan.models()) == 17
    html = (out / "index.html").read_text()
    assert html.count("<svg") == 3 + plan.num_amr and 'id="lambda"' in html and 'id="amr-count"' in html
    assert 'id="autoattack"' in html

    # AutoAttack on every fusion model, as a cascade in RS, on the clips of the model's report;
    # a clip counts as robust in "worst of all" only if neither the suite nor AutoAttack broke it.
    aa = json.loads((out / "autoattack.json").read_text())
    fusion = [s.key for s in plan.models() if s.arch == "fusion"]
    assert [r["key"] for r in aa["rows"]] == fusion and aa["attacks"] == "APGD-CE4 → APGD-DLR4 → Square20"
    for row in aa["rows"]:
        own = json.loads((out / "reports" / f"{row['key']}.json").read_text())
        cascade = json.loads((out / "reports" / "autoattack" / f"{row['key']}.json").read_text())
        assert cascade["config"]["strategy"] == "worst-case"
        assert {c["mode"] for c in cascade["config"]["suite"]} == {"RS"}
        assert cascade["clean"] == own["clean"] and cascade["dataset"]["num_samples"] == plan.eval_clips
        assert row["autoattack_RS"] == cascade["worst_case"][0]["modes"]["RS"]["accuracy"]
        assert row["worst_RS"] <= min(row["pgd_RS"], row["cw_RS"])
        n = plan.eval_clips
        assert row["worst_of_all_RS"] * n / 100 == pytest.approx(row["worst_RS"] * n / 100 - row["only_autoattack"])
        assert row["worst_of_all_RS"] * n / 100 == pytest.approx(row["autoattack_RS"] * n / 100 - row["only_suite"])

    table1 = json.loads((out / "table1.json").read_text())
    assert [r["attack"] for r in table1["rows"]] == ["FGSM", plan.pgd.upper(), plan.cw.upper()]
    assert table1["eps"] == 6 and table1["rows"][0]["unimodal_R"] is not None

    table2 = json.loads((out / "table2.json").read_text())
    assert [r["name"] for r in table2["rows"]] == ["None", "AT-R", "AT-S", "AT-RS", "MinSim", "ExFMem",
                                                  "MinSim+ExFMem", "AMR"]
    base = table2["rows"][0]
    for row in table2["rows"]:
        assert row["eps_used"] == 8
        assert row["avg"] == pytest.approx((row["R"] + row["S"] + row["RS"]) / 3)
        # eq. 14, against the undefended row
        assert row["ri"] == pytest.approx((row["clean"] + row["avg"]) - (base["clean"] + base["avg"]))

    # Beside each table, the paper's numbers of the layout's dataset (NTU RGB+D here).
    assert table2["paper"]["dataset"] == "NTU RGB+D" and table2["paper"]["rows"][-1]["clean"] == 81.65
    table2_cw = json.loads((out / "table2-cw.json").read_text())
    assert table2_cw["paper"]["attack"] == "CW30" and table2_cw["paper"]["rows"][-1]["RS"] == 66.61

    table3 = json.loads((out / "table3.json").read_text())
    assert [r["index"] for r in table3["rows"]] == [1, 2, 3]
    # Table 3 is the AMR checkpoint's σ(θ), read here straight from the file.
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(out / "runs" / "amr" / "model" / "model.safetensors"))
    for i, row in enumerate(table3["rows"]):
        for key, name in (("mean_rgb", "w_rgb"), ("mean_skel", "w_skel")):
            assert row[key] == pytest.approx(torch.sigmoid(tensors[f"amrs.{i}.{name}"].float()).mean().item(),
                                             abs=1e-6), (i, key)

    table4 = json.loads((out / "table4.json").read_text())
    assert table4["attack"] == plan.cw.upper()
    assert [r["num_amr"] for r in table4["rows"]] == [None, 0, 1, 2, 3, 3]
    assert table4["rows"][-1]["frozen"] and table4["models"]["3 AMRs, W frozen at 0.5"] == "amr-frozen"
    by_count = {r["num_amr"]: r for r in table4["rows"]}
    at_rs = next(r for r in table2["rows"] if r["name"] == "AT-RS")
    assert by_count[0]["clean"] == at_rs["clean"]  # 0 AMRs is the AT-RS model

    table5 = json.loads((out / "table5.json").read_text())
    lam_rows = [r for r in table5["rows"] if r["lam"] is not None]
    assert [r["lam"] for r in lam_rows] == [0.1, 0.5, 1.0, 2.0, 5.0]
    assert table5["models"]["λ=1"] == "amr-1" == table4["models"]["1 AMR"]  # reused

    # A rerun skips every model and report, rewrites the tables, and leaves results alone.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "reports").glob("*.json")}
    first = {(s["kind"], s["key"]): s for s in json.loads((out / "run.json").read_text())["stages"]}
    log = run("reproduce", "--out", out, "--size", "small", "--seed", 0, "--device", "cpu")
    assert log.count("skipped (already done)") == len(stages) - 1  # all but the tables
    # run.json keeps what each skipped stage took when it ran.
    again = json.loads((out / "run.json").read_text())["stages"]
    assert [s["status"] for s in again].count("skipped") == len(stages) - 1
    for s in again:
        if s["status"] == "skipped":
            assert first[(s["kind"], s["key"])]["status"] == "done"
            assert s["done_seconds"] == first[(s["kind"], s["key"])]["seconds"], s
    assert sum("AutoAttack" in s.label for s in stages) == 15
    assert {p.name: p.stat().st_mtime_ns for p in (out / "reports").glob("*.json")} == before
    assert json.loads((out / "table2.json").read_text())["rows"] == table2["rows"]

    # Another plan in the same folder is refused rather than mixed in.
    result = CliRunner().invoke(app, ["reproduce", "--out", str(out), "--size", "small", "--epochs", "2"])
    assert result.exit_code == 2 and "another plan" in result.output


def test_reproduce_small_on_the_imigue_layout(tmp_path):
    """The whole reproduction on the iMiGUE-style layout: 2-D OpenPose skeletons of 22
    joints and one body, every model trained and evaluated, every table written."""
    out = tmp_path / "repro"
    log = run("reproduce", "--out", out, "--size", "small", "--layout", "imigue", "--device", "cpu")
    assert "imigue-layout clips" in log
    meta = json.loads((out / "data" / "cache" / "meta.json").read_text())
    assert (meta["layout"], meta["joints"], meta["skel_channels"], meta["persons"]) == ("imigue", 22, 2, 1)
    plan = plan_for("small", layout="imigue")
    assert meta["num_samples"] == plan.num_clips
    reports = sorted((out / "reports").glob("*.json"))
    assert len(reports) == len(plan.models()) == 17
    for path in reports:
        report = json.loads(path.read_text())
        assert report["dataset"]["layout"] == "imigue", path.name
        if report["model"]["arch"] != "rgb":
            assert (report["model"]["config"]["joints"], report["model"]["config"]["skel_channels"]) == (22, 2)
            assert len(report["worst_case"][0]["eps_skel_pixels"]) == 2
    for name in table_files(plan):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # Beside each table, the paper's iMiGUE numbers, not NTU RGB+D's.
    for stem, clean in (("table1", 62.37), ("table2", 62.37), ("table2-cw", 62.37), ("table4", 62.37)):
        paper = json.loads((out / f"{stem}.json").read_text())["paper"]
        assert paper["dataset"].startswith("iMiGUE") and paper["rows"][0]["clean"] == clean, stem
    assert json.loads((out / "table2.json").read_text())["paper"]["rows"][-1]["RS"] == 32.94  # AMR, PGD20
    assert "Paper (iMiGUE" in (out / "table4.md").read_text()
    # As the paper's iMiGUE model, the main AMR model (and its frozen ablation) has 1 AMR.
    assert json.loads((out / "table4.json").read_text())["models"]["1 AMR, W frozen at 0.5"] == "amr-frozen"
    assert "(1 AMR)" in (out / "table3.md").read_text()
    # A plan of the other layout in the same folder is refused.
    result = CliRunner().invoke(app, ["reproduce", "--out", str(out), "--size", "small"])
    assert result.exit_code == 2 and "layout" in result.output


def test_reproduce_runs_a_subset_then_resumes_an_interrupted_run(tmp_path):
    """`--models` trains and evaluates only those models and leaves the tables to the run
    that completes the plan, which then skips them. Then delete one report and one model:
    only those stages run again."""
    out = tmp_path / "repro"
    bad = CliRunner().invoke(app, ["reproduce", "--out", str(out), "--size", "small", "--models", "amr,bogus"])
    assert bad.exit_code == 2 and "unknown model bogus" in bad.output and "amr-frozen" in bad.output
    assert not out.exists()  # refused before any folder is made

    log = run("reproduce", "--out", out, "--size", "small", "--device", "cpu", "--models", "skeleton,at-s")
    assert sorted(p.name for p in (out / "reports").glob("*.json")) == ["at-s.json", "skeleton.json"]
    assert (out / "reports" / "autoattack" / "at-s.json").is_file()  # AT-S is a fusion model
    # 15 models and the AutoAttack reports of 14 fusion models
    assert "not yet: 29 of the plan's reports are missing" in log and "amr (AutoAttack)" in log
    assert "the tables wait" in log
    assert not any((out / name).exists() for name in table_files(plan_for("small")))
    assert json.loads((out / "run-models.json").read_text())["models"] == ["at-s", "skeleton"]

    # A folder started before plans had the autoattack field continues with the new stages
    # (and its plan.json gains the field); another AutoAttack setting is refused.
    stored = json.loads((out / "plan.json").read_text())
    del stored["autoattack"]
    (out / "plan.json").write_text(json.dumps(stored))
    log = run("reproduce", "--out", out, "--size", "small", "--device", "cpu")
    assert json.loads((out / "plan.json").read_text()) == plan_for("small").to_dict()
    refused = CliRunner().invoke(app, ["reproduce", "--out", str(out), "--size", "small", "--no-autoattack"])
    assert refused.exit_code == 2 and "differs in autoattack" in refused.output
    skipped = [line.split("] ")[1].split(": skipped")[0].split(" (")[0] for line in log.splitlines()
               if "skipped (already done)" in line]
    assert sorted(skipped) == sorted([f"synthesise {plan_for('small').num_clips} clips and prepare the tiny cache",
                                      "train Unimodal S", "train AT-S", "evaluate Unimodal S", "evaluate AT-S",
                                      "AutoAttack AT-S"])
    assert all((out / name).is_file() for name in table_files(plan_for("small")))

    (out / "reports" / "amr-2.json").unlink()
    shutil.rmtree(out / "runs" / "at-s" / "model")
    (out / "reports" / "at-s.json").unlink()
    log = run("reproduce", "--out", out, "--size", "small", "--device", "cpu")
    done = [line for line in log.splitlines() if ": done in" in line]
    assert [line.split("] ")[1].split(": done in")[0].split(" (")[0] for line in done] == [
        "train AT-S", "evaluate AT-S", "evaluate 2 AMRs", "write Tables 1-5, Figures 2 and 4, index.html"]
    # The AutoAttack report of AT-S was kept though the model was retrained: the same seed
    # gives the same weights, which the table checks (it refuses a report of other weights).
    cascade = out / "reports" / "autoattack" / "at-s.json"
    doc = json.loads(cascade.read_text())
    doc["model"]["weights_sha256"] = "0" * 64
    cascade.write_text(json.dumps(doc))
    (out / "reports" / "amr-2.json").unlink()
    bad = CliRunner().invoke(app, ["reproduce", "--out", str(out), "--size", "small", "--device", "cpu"])
    assert bad.exit_code == 2 and "at-s.json was not run on the checkpoint" in bad.output


def _denormals_flushed() -> bool:
    import torch

    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


def test_reproduce_evaluates_like_evaluate_and_never_flushes_denormals(tmp_path):
    """The same checkpoint scores clip for clip the same under `reproduce` and `robustact
    evaluate`, and denormals are flushed (for speed) in training stages only."""
    import numpy as np
    import torch

    from robustact.models.evaluate import ClipRecords
    from robustact.models.reproduce import run_plan

    with _flush():  # the probe itself must see a flush
        assert _denormals_flushed()
    assert not _denormals_flushed()

    out = tmp_path / "repro"
    plan = plan_for("small")
    seen: dict[str, set] = {}
    run_plan(plan, out, device="cpu",
             progress=lambda p: seen.setdefault(p["phase"], set()).add(_denormals_flushed()))
    assert seen["train"] == {True} and seen["evaluate"] == {False}

    repro = ClipRecords.load(out / "reports" / "amr.clips.npz")
    cli = tmp_path / "amr.json"
    run("evaluate", "--model", out / "runs" / "amr" / "model", "--data", out / "data" / "cache", "--out", cli,
        "--attacks", f"{plan.pgd},{plan.cw}", "--eps", 8, "--seed", plan.seed, "--device", "cpu")
    direct = ClipRecords.load(tmp_path / "amr.clips.npz")
    assert len(direct) > len(repro)  # the CLI ran the whole test split, reproduce a subset
    # `--limit N --seed S` takes the same class-balanced clips as reproduce (and the API's
    # max_samples), so a stronger attack can be run afterwards on exactly those clips.
    limited = tmp_path / "amr-limited.json"
    run("evaluate", "--model", out / "runs" / "amr" / "model", "--data", out / "data" / "cache", "--out", limited,
        "--attacks", "fgsm", "--eps", 8, "--seed", plan.seed, "--limit", plan.eval_limit, "--device", "cpu",
        "--no-diagnostics")
    assert sorted(ClipRecords.load(tmp_path / "amr-limited.clips.npz").clip.tolist()) == sorted(repro.clip.tolist())
    rows = np.searchsorted(direct.clip, repro.clip)
    assert np.array_equal(direct.clip[rows], repro.clip)
    columns = [direct.suite.index(entry) for entry in repro.suite]
    assert np.array_equal(direct.clean_pred[rows], repro.clean_pred)
    assert np.array_equal(direct.outcome[rows][:, columns], repro.outcome)
    assert np.array_equal(direct.iterate[rows][:, columns], repro.iterate)


class _flush:
    def __enter__(self):
        import torch

        torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        import torch

        torch.set_flush_denormal(False)
