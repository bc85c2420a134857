"""The installable package (issue 10): everything under the ``robustact`` namespace (no
top-level ``models``/``service``/``worker``/``migrations`` in site-packages), a console
script, and the small public API ``from robustact import attack, evaluate, load_model``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")  # a copy: building writes build/ beside pyproject.toml
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("robustact", "models", "service", "worker", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(out), str(source)], check=True, timeout=300)
    return next(out.glob("robustact-*.whl"))


def test_the_wheel_installs_everything_under_robustact(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"robustact"}, sorted(tops)
    for needed in ("robustact/__init__.py", "robustact/models/fusion.py", "robustact/models/attacks/pgd.py",
                   "robustact/service/app.py", "robustact/worker/tasks.py", "robustact/migrations/env.py",
                   "robustact/migrations/script.py.mako", "robustact/migrations/versions/0001_initial.py"):
        assert needed in names, needed
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.11\n" in meta  # not capped
    assert not [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch==")]  # not pinned
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "robustact = robustact.service.cli:app" in entry

    # Unpacked beside a project that has its own models/ package: both import, no collision.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("MINE = True\n")
    code = ("import models, robustact, robustact.models.fusion, robustact.service.app, robustact.worker.tasks;"
            "assert models.MINE; assert robustact.models.fusion.__file__.startswith(%r);"
            "from robustact import attack, evaluate, load_model; print('ok')") % str(site)
    env = {"PYTHONPATH": f"{project}:{site}", "PATH": "/usr/bin:/bin", "ROBUSTACT_DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_public_api_trains_attacks_and_evaluates(tmp_path):
    from robustact import attack, evaluate, load_model
    from robustact.models.config import TrainConfig, preset_config
    from robustact.models.data.cache import prepare
    from robustact.models.data.synth import synthesize
    from robustact.models.train import train

    root = tmp_path / "raw"
    synthesize(root, num_classes=3, subjects=(1, 3), cameras=(1,), replications=(1, 2), frames=16,
               video_size=(32, 32), seed=0)
    cfg = preset_config("tiny", num_classes=3)
    cache = tmp_path / "cache"
    prepare(root, cache, rgb_frames=cfg.rgb_frames, rgb_size=cfg.rgb_size, skel_frames=cfg.skel_frames, workers=1)
    from robustact.models.data.cache import ClipDataset

    train(cfg, TrainConfig(defence="none", epochs=1, batch_size=3), ClipDataset(cache, split="train"),
          tmp_path / "run", preset="tiny", device="cpu")
    model, meta = load_model(tmp_path / "run" / "model", device="cpu")
    assert meta["class_names"] and next(model.parameters()).dtype == torch.float32

    data = ClipDataset(cache, split="test")
    rgb = torch.stack([data[i][0] for i in range(3)])
    skel = torch.stack([data[i][1] for i in range(3)])
    labels = torch.tensor([data[i][2] for i in range(3)])
    result = attack(model, rgb, skel, labels, "pgd5", mode="RS", eps=8)
    assert (result.rgb - rgb).abs().max() <= 8 / 255 + 1e-6 and result.broken.shape == (3,)
    with pytest.raises(ValueError, match="not one attack"):
        attack(model, rgb, skel, labels, "autoattack")

    report, records = evaluate(model, meta, cache, attacks=["fgsm"], eps=[8], diagnostics=False)
    assert report["dataset"]["num_samples"] == len(data) == len(records.clip)
    assert report["attacks"][0]["label"] == "FGSM"
