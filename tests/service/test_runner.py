"""``serve`` (behind ``robustact serve`` / ``make run``) as a newcomer meets it: one process
that migrates, seeds a synthetic dataset, runs the API and a real worker, and takes the
worker down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.runner import SEED_DATASET, ensure_seed_dataset
from service.settings import Settings
from tests.service.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_serve_seeds_a_dataset_and_runs_a_worker(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTACT_")}
    env["ROBUSTACT_WORKER_TORCH_THREADS"] = "1"  # the API, the worker and pytest share the cores
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from service.runner import serve; serve(port={port}, data_dir={str(tmp_path / 'var')!r})"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        datasets = client.get("/v1/datasets").json()["items"]
        assert [d["name"] for d in datasets] == [SEED_DATASET]
        assert datasets[0]["splits"]["xsub"] == {"train": 45, "test": 15}

        r = client.post("/v1/jobs", json={"kind": "train", "dataset_id": SEED_DATASET, "defence": "none",
                                          "epochs": 1, "max_samples": 10})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/jobs/{r.json()['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert job["status"] == "succeeded", (job, (tmp_path / "serve.log").read_text()[-3000:])
        workers = _children(proc.pid)
        assert workers, "serve should run a worker subprocess"
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    # A second start finds the dataset already there.
    assert ensure_seed_dataset(Settings(data_dir=tmp_path / "var")) is None
