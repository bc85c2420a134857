"""End to end through the CLI: data synth → data prepare → train → evaluate → compare.

The synthetic set is written in the real NTU layout and read back by the real reader.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from robustact.models.evaluate import ClipRecords
from robustact.models.report import load_report
from robustact.service.cli import app

pytestmark = pytest.mark.slow


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"robustact {' '.join(map(str, args))}\n{result.output}"
    return result.output


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ntu")
    run("data", "synth", "--out", root / "raw", "--classes", 3, "--subjects", "1,3", "--cameras", "1,2",
        "--replications", "1,2", "--frames", 24, "--seed", 0)
    assert sorted(p.name for p in (root / "raw").iterdir()) >= ["classes.txt", "nturgb+d_rgb", "nturgb+d_skeletons"]
    run("data", "prepare", root / "raw", "--out", root / "cache", "--preset", "tiny")
    return root / "cache"


def test_synth_train_evaluate_compare(cache, tmp_path):
    reports = []
    for defence in ("none", "amr"):
        out = run("train", "--data", cache, "--out", tmp_path / defence, "--defence", defence, "--num-amr", 2,
                  "--epochs", 2, "--batch-size", 4, "--attack-steps", 2)
        assert "epoch 2/2" in out
        checkpoint = tmp_path / defence / "model"
        assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "config.json"}
        report_path = tmp_path / f"{defence}.json"
        out = run("evaluate", "--model", checkpoint, "--data", cache, "--out", report_path,
                  "--attacks", "fgsm,pgd5", "--modes", "R,S,RS", "--name", defence)
        assert "PGD5" in out
        report = load_report(report_path)
        assert report["model"]["name"] == defence and report["dataset"]["split"] == "test"
        clean = report["clean"]["accuracy"]
        pgd = [a for a in report["attacks"] if a["label"] == "PGD5"][0]
        assert set(pgd["modes"]) == {"R", "S", "RS"}
        # Robust = clean-correct and not broken: never above clean, in every mode, and the
        # worst case is below every per-attack column.
        worst = report["worst_case"][0]
        for entry in report["attacks"]:
            for m in ("R", "S", "RS"):
                assert 0 <= worst["modes"][m]["accuracy"] <= entry["modes"][m]["accuracy"] <= clean, "robust > clean"
        assert worst["overall"]["accuracy"] <= worst["modes"]["RS"]["accuracy"]
        records = ClipRecords.load(report_path.with_name(f"{defence}.clips.npz"))
        assert report["per_clip"]["file"] == f"{defence}.clips.npz" and len(records) == report["dataset"]["num_samples"]
        assert np.isin(records.outcome[~records.clean_correct], [-1]).all(), "a clip wrong on clean input was attacked"
        assert len(report["clean"]["per_class"]) == 3
        reports.append(report_path)
    amr = json.loads(reports[1].read_text())
    # The report's AMR weights are the checkpoint's σ(θ), read here straight from the file.
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "amr" / "model" / "model.safetensors"))
    assert len(amr["amr_weights"]) == 2
    for i, entry in enumerate(amr["amr_weights"]):
        for key, name in (("mean_rgb", "w_rgb"), ("mean_skel", "w_skel")):
            assert entry[key] == pytest.approx(torch.sigmoid(tensors[f"amrs.{i}.{name}"].float()).mean().item(),
                                               abs=1e-6), (i, key)

    out = run("compare", *reports, "--baseline", "none", "--attack", "PGD5")
    lines = out.splitlines()
    assert lines[0].startswith("PGD5 at ε = 8/255 — RI against none")
    assert lines[1].split()[-2:] == ["RI", "WC"]
    assert lines[3].split()[-2] == "0.00"  # the baseline's RI


def test_cli_errors_are_one_line(cache, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "not a prepared cache" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), "--defence", "magic"])
    assert bad.exit_code == 2 and "defence" in bad.output
    bad = runner.invoke(app, ["train", "--data", str(cache), "--out", str(tmp_path / "r"), "--preset", "paper"])
    assert bad.exit_code == 2 and "prepared for" in bad.output
    bad = runner.invoke(app, ["evaluate", "--model", str(tmp_path), "--data", str(cache), "--out",
                              str(tmp_path / "x.json"), "--attacks", "deepfool"])
    assert bad.exit_code == 2 and "unknown attack 'deepfool'" in bad.output


def test_evaluate_in_shards_then_merge_equals_one_run(cache, tmp_path):
    """`evaluate --shard I/N` on N "machines", then `merge`: the same per-clip table and the
    same figures as one unsharded run (random starts depend on clip ids only)."""
    run("train", "--data", cache, "--out", tmp_path / "run", "--defence", "none", "--epochs", 2, "--batch-size", 4,
        "--loader-workers", 2)
    checkpoint = tmp_path / "run" / "model"
    common = ["--model", checkpoint, "--data", cache, "--attacks", "fgsm,pgd5", "--seed", 4]
    run("evaluate", *common, "--out", tmp_path / "whole.json")
    parts = []
    for i in (1, 2, 3):
        out = run("evaluate", *common, "--out", tmp_path / f"part{i}.json", "--shard", f"{i}/3",
                  "--loader-workers", i - 1)  # DataLoader processes do not change a result
        parts.append(tmp_path / f"part{i}.json")
    out = run("merge", *parts, "--out", tmp_path / "merged.json")
    assert "merged 3 shards" in out
    whole, merged = load_report(tmp_path / "whole.json"), load_report(tmp_path / "merged.json")
    a = ClipRecords.load(tmp_path / "whole.clips.npz")
    b = ClipRecords.load(tmp_path / "merged.clips.npz")
    order = np.argsort(a.clip)
    for name in ClipRecords.ARRAYS:
        assert np.array_equal(getattr(a, name)[order], getattr(b, name)), name
    assert merged["clean"] == whole["clean"] and merged["worst_case"] == whole["worst_case"]
    assert merged["attacks"] == whole["attacks"] and merged["config"]["shards"] == 3

    bad = CliRunner().invoke(app, ["merge", str(parts[0]), str(parts[2]), "--out", str(tmp_path / "x.json")])
    assert bad.exit_code != 0 and "shards 1..N" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["evaluate", *map(str, common), "--out", str(tmp_path / "y.json"), "--shard", "4/3"])
    assert bad.exit_code != 0 and "shard" in bad.output and "Traceback" not in bad.output
