"""Sharded evaluation over Celery: one evaluation of a tiny-preset model, unsharded on one
worker process, then in 2 shards on two worker processes, each worker with one torch
thread, on the same machine, side by side in one run.

Embedded backends (SQLite, file store, kombu's SQLAlchemy broker) in a temp directory; the
API in this process (uvicorn thread, which does no torch work); real Celery worker
subprocesses started as ``robustact worker`` starts them. The model is trained first
(3 epochs), which also prepares the decoded cache, so neither arm pays for decoding.

    python bench/shard_scaling.py [--attacks pgd20] [--subjects 1,2,3,6,7] [--repeats 1]

Last line: one JSON object with seconds_1_worker, seconds_2_workers, shard_speedup,
sharded_equals_unsharded (per-clip outcomes, iterates and restarts identical), clips.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(client: httpx.Client, job_id: str, timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} still {job['status']} after {timeout}s")
        time.sleep(0.2)


def wait_workers(client: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 120
    while not client.get("/readyz").json()["checks"]["workers"].startswith(f"ok ({count} alive"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} workers did not come up")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", default="pgd20")
    parser.add_argument("--subjects", default="1,2,3,6,7", help="synthetic subjects (3, 6, 7 are X-Sub test subjects)")
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args()

    import uvicorn

    from robustact.models.data.synth import synthesize
    from robustact.service.app import create_app
    from robustact.service.auth import create_key
    from robustact.service.db import make_engine, make_sessionmaker
    from robustact.service.runner import start_worker, stop_worker
    from robustact.service.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    root = tmp / "datasets" / "bench"
    subjects = tuple(int(s) for s in args.subjects.split(","))
    synthesize(root, num_classes=args.classes, subjects=subjects, cameras=(1, 2, 3), replications=(1,), frames=32,
               video_size=(64, 48), seed=0)
    settings = Settings(data_dir=tmp / "data", seed_dataset=False, device="cpu", api_torch_threads=1,
                        worker_torch_threads=1, dataset_roots=str(tmp / "datasets"), heartbeat_interval_s=2.0,
                        decode_workers=1)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        _row, key = create_key(session, "bench", admin=True)
    engine.dispose()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Authorization": f"Bearer {key}"})
    workers = [start_worker(settings, hostname="bench-0@%h", log_file=tmp / "worker-0.log")]
    try:
        wait_workers(client, 1)
        dataset = client.post("/v1/datasets", json={"name": "bench", "format": "synthetic", "location": str(root)}).json()
        trained = wait(client, client.post("/v1/jobs", json={
            "kind": "train", "dataset_id": dataset["id"], "defence": "none", "epochs": 3, "batch_size": 6}).json()["id"])
        assert trained["status"] == "succeeded", trained
        model = trained["outputs"]["model_id"]
        body = {"kind": "evaluate", "model_id": model, "attacks": args.attacks.split(","), "modes": ["R", "S", "RS"],
                "eps": [8], "seed": 1, "batch_size": 8}

        t0 = time.perf_counter()
        one = wait(client, client.post("/v1/jobs", json={**body, "shards": 1}).json()["id"])
        seconds_1 = time.perf_counter() - t0
        assert one["status"] == "succeeded", one

        workers.append(start_worker(settings, hostname="bench-1@%h", log_file=tmp / "worker-1.log"))
        wait_workers(client, 2)
        t0 = time.perf_counter()
        two = wait(client, client.post("/v1/jobs", json={**body, "shards": 2}).json()["id"])
        seconds_2 = time.perf_counter() - t0
        assert two["status"] == "succeeded", two

        def table(job):
            data = client.get(f"/v1/reports/{job['outputs']['report_id']}/clips", params={"format": "json"}).json()
            order = sorted(range(len(data["clip"])), key=data["clip"].__getitem__)
            return {k: [v[i] for i in order] for k, v in data.items() if isinstance(v, list) and k != "suite"}

        a, b = table(one), table(two)
        clips = len(a["clip"])
        equal = a == b
        workers_used = sorted({s["worker"] for s in two["shards"]})
        print(f"clips {clips}, attacks {args.attacks} x R,S,RS, eps 8/255")
        print(f"1 worker,  1 shard : {seconds_1:7.1f} s")
        print(f"2 workers, 2 shards: {seconds_2:7.1f} s  (shards ran on {', '.join(workers_used)})")
        print(f"speedup {seconds_1 / seconds_2:.2f}x; per-clip tables identical: {equal}")
        print(json.dumps({"clips": clips, "seconds_1_worker": round(seconds_1, 2), "seconds_2_workers": round(seconds_2, 2),
                          "shard_speedup": round(seconds_1 / seconds_2, 3), "sharded_equals_unsharded": equal}))
    finally:
        for w in workers:
            stop_worker(w)
        server.should_exit = True


if __name__ == "__main__":
    main()
