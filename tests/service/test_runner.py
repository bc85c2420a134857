"""``serve`` (behind ``robustact serve`` / ``make run``) as a newcomer meets it: one process
that migrates, creates the first admin key, seeds a synthetic dataset shared with every key,
runs the API and a real worker, and takes the worker down with it; ``robustact keys``
makes, lists and revokes keys on the same data directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from robustact.service.runner import SEED_DATASET, ensure_seed_dataset
from robustact.service.settings import Settings
from tests.service.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(out))


def _start_serve(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen, httpx.Client, object]:
    """``serve`` in a subprocess on a free port with ``ROBUSTACT_*`` ``settings`` (and nothing
    else from this environment), once ``/readyz`` answers 200: (process, client, log file)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTACT_")}
    env["ROBUSTACT_WORKER_TORCH_THREADS"] = "1"  # the API, the worker and pytest share the cores
    env.update({f"ROBUSTACT_{k.upper()}": v for k, v in settings.items()})
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from service.runner import serve; serve(port={port}, data_dir={str(tmp_path / 'var')!r})"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return proc, client, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp_path / "serve.log").read_text())
        time.sleep(0.2)


def test_serve_seeds_a_dataset_and_runs_a_worker(tmp_path):
    proc, client, log = _start_serve(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTACT_")}
    try:
        assert client.get("/v1/datasets").status_code == 401  # no key
        key_file = tmp_path / "var" / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert str(key_file) in (tmp_path / "serve.log").read_text()  # it says where the key is
        admin = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        assert client.get("/v1/keys/me", headers=admin).json()["admin"] is True

        # A user key made with the CLI on the same data directory sees the seed dataset.
        cli = [sys.executable, "-m", "robustact.service.cli", "keys"]
        made = subprocess.run(cli + ["create", "--name", "alice", "--data-dir", str(tmp_path / "var")], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        user = {"Authorization": f"Bearer {made.stdout.strip()}"}
        datasets = client.get("/v1/datasets", headers=user).json()["items"]
        assert [d["name"] for d in datasets] == [SEED_DATASET]
        assert datasets[0]["splits"]["xsub"] == {"train": 45, "test": 15}
        assert datasets[0]["shared"] is True and datasets[0]["location"] is None

        r = client.post("/v1/jobs", headers=user, json={"kind": "train", "dataset_id": SEED_DATASET,
                                                        "defence": "none", "epochs": 1, "max_samples": 10})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/jobs/{r.json()['id']}", headers=user).json())["status"] in (
                "queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert job["status"] == "succeeded", (job, (tmp_path / "serve.log").read_text()[-3000:])
        workers = _children(proc.pid)
        assert workers, "serve should run a worker subprocess"
        # The admin sees the user's job; the user's model is the user's.
        assert client.get(f"/v1/jobs/{job['id']}", headers=admin).status_code == 200
        model_id = job["outputs"]["model_id"]
        assert client.get(f"/v1/models/{model_id}", headers=user).json()["owner_id"] == \
            client.get("/v1/keys/me", headers=user).json()["id"]

        listed = subprocess.run(cli + ["list", "--data-dir", str(tmp_path / "var")], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        alice = next(line.split()[0] for line in listed.stdout.splitlines() if line.endswith("alice"))
        revoked = subprocess.run(cli + ["revoke", alice, "--data-dir", str(tmp_path / "var")], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert revoked.returncode == 0, revoked.stderr
        assert client.get("/v1/datasets", headers=user).status_code == 401
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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _worker_children(pid: int) -> list[int]:
    return [c for c in _children(pid) if "robustact.worker.launch" in _cmdline(c)]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_serve_respawns_a_killed_worker_and_its_job_succeeds(tmp_path):
    """`kill -9` of the embedded worker mid-training: `serve` starts a new worker, the API's
    reaper requeues the job once its heartbeat is stale, and it resumes and succeeds with no
    restart by hand. Then `serve` itself is SIGKILLed: its worker does not outlive it."""
    proc, client, log = _start_serve(tmp_path, heartbeat_timeout_s="4", heartbeat_interval_s="0.5",
                                     decode_workers="1")
    survivors: list[int] = []
    try:
        client.headers["Authorization"] = f"Bearer {(tmp_path / 'var' / 'admin.key').read_text().strip()}"
        r = client.post("/v1/jobs", json={"kind": "train", "dataset_id": SEED_DATASET, "defence": "at-rs",
                                          "attack": {"steps": 2}, "epochs": 6, "max_samples": 10, "batch_size": 2})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 180
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running" and (job["progress"] or {}).get("epoch", 0) >= 1:
                break
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.2)
        [first] = _worker_children(proc.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not [w for w in _worker_children(proc.pid) if w != first and not _gone(w)]:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded" and job["attempts"] == 2, (job, (tmp_path / "serve.log").read_text()[-3000:])
        assert "starting a new one" in (tmp_path / "serve.log").read_text()
        survivors = _children(proc.pid)  # the new worker and the decoder child
        assert survivors
    finally:
        client.close()
        proc.kill()  # no chance to stop anything
        proc.wait(30)
        log.close()
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in survivors):
        assert time.monotonic() < deadline, [(pid, _cmdline(pid)) for pid in survivors if not _gone(pid)]
        time.sleep(0.2)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_missing_backend_is_one_clear_line(command, tmp_path, s3_endpoint):
    """No traceback: exit 2 and one line naming the backend (password hidden) and the fix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTACT_")}
    cases = [({"ROBUSTACT_DATABASE_URL": "postgresql+psycopg://app:s3cret@127.0.0.1:9/robustact"},
              "cannot reach the database postgresql+psycopg://app:***@127.0.0.1:9/robustact"),
             ({"ROBUSTACT_STORE_URL": "s3://no-such-bucket-here/x", "ROBUSTACT_S3_ENDPOINT_URL": s3_endpoint},
              "cannot use the object store s3://no-such-bucket-here/x")]
    for extra, words in cases:
        done = subprocess.run([sys.executable, "-m", "robustact.service.cli", command, "--data-dir", str(tmp_path / "var")],
                              cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
        assert "s3cret" not in done.stderr and "Traceback" not in done.stderr
