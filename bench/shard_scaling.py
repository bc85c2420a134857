"""Sharded evaluation over Celery: one evaluation of a tiny-preset model, unsharded on one
worker process, then in 2 shards (taking units, an attack on one batch of clips, from a
queue) on two worker processes, each worker with one torch
thread, on the same machine, side by side in one run.

Embedded backends (SQLite, file store, kombu's SQLAlchemy broker) in a temp directory; the
API in this process (uvicorn thread, which does no torch work); real Celery worker
subprocesses started as ``robustact worker`` starts them. The model is trained first
(10 epochs: only clips classified correctly are attacked), which also prepares the decoded cache, so neither arm pays for decoding.

    python bench/shard_scaling.py [--attacks pgd100,cw100] [--subjects 1,2,3,6,7,10,11,12]

Last line: one JSON object with seconds_1_worker, seconds_2_workers, shard_speedup,
sharded_equals_unsharded (every per-clip field identical), differing_outcomes of outcomes
(clip × suite entry), clips.

Identity is exact up to floating point: a clip's random start and steps do not depend on
its batch or shard, but a batched convolution rounds differently with other clips beside
it (~1e-7 on the logits); over a 100-step attack that can flip a clip that ends within
rounding of the decision boundary. Such flips are counted, not hidden.
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
    parser.add_argument("--attacks", default="pgd100,cw100")
    parser.add_argument("--subjects", default="1,2,3,6,7,10,11,12",
                        help="synthetic subjects (3, 6, 7, 10, 11, 12 are X-Sub test subjects)")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (only clean-correct clips are attacked)")
    parser.add_argument("--shards", type=int, default=2, help="shards of the 2-worker run (one per worker: shards "
                        "take units of work from a queue, so a shard that finishes early takes more)")
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
            "kind": "train", "dataset_id": dataset["id"], "defence": "none", "epochs": args.epochs, "batch_size": 6}).json()["id"])
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
        # Warm the new worker as the first one is (imports, model download, cache opened):
        # a small 2-shard evaluation, not timed.
        warm = wait(client, client.post("/v1/jobs", json={**body, "attacks": ["fgsm"], "shards": 2}).json()["id"])
        assert warm["status"] == "succeeded" and len({s["worker"] for s in warm["shards"]}) == 2, warm
        t0 = time.perf_counter()
        two = wait(client, client.post("/v1/jobs", json={**body, "shards": args.shards}).json()["id"])
        seconds_2 = time.perf_counter() - t0
        assert two["status"] == "succeeded", two

        def table(job):
            data = client.get(f"/v1/reports/{job['outputs']['report_id']}/clips", params={"format": "json"}).json()
            order = sorted(range(len(data["clip"])), key=data["clip"].__getitem__)
            return {k: [v[i] for i in order] for k, v in data.items() if isinstance(v, list) and k != "suite"}

        shards = client.get("/v1/jobs", params={"parent_id": two["id"]}).json()["items"]
        for shard in sorted(shards, key=lambda j: j["params"]["shard"]):
            t = shard["timings"]
            print(f"  shard {shard['params']['shard'] + 1} on {shard['worker']}: waited {t['queued_seconds']:.1f} s, "
                  f"ran {t['running_seconds']:.1f} s, {shard['progress']['units_done']} of "
                  f"{shard['progress']['units']} units")
        print(f"  unsharded job ran {one['timings']['running_seconds']:.1f} s; sharded evaluation from first start "
              f"to merged report {two['timings']['running_seconds']:.1f} s")
        a, b = table(one), table(two)
        clips = len(a["clip"])
        equal = a == b
        differing = sum(x != y for field in ("outcome",) for row_a, row_b in zip(a[field], b[field])
                        for x, y in zip(row_a, row_b))
        for field in a:
            differ = [a["clip"][i] for i in range(clips) if a[field][i] != b[field][i]]
            if differ:
                print(f"  {field}: {len(differ)} clip(s) differ, e.g. clip {differ[0]}: "
                      f"{a[field][a['clip'].index(differ[0])]} vs {b[field][b['clip'].index(differ[0])]}")
        workers_used = sorted({s["worker"] for s in two["shards"]})
        print(f"clips {clips}, attacks {args.attacks} x R,S,RS, eps 8/255")
        print(f"1 worker,  1 shard : {seconds_1:7.1f} s")
        print(f"2 workers, {args.shards} shards: {seconds_2:7.1f} s  (shards ran on {', '.join(workers_used)})")
        print(f"speedup {seconds_1 / seconds_2:.2f}x; per-clip tables identical: {equal}")
        print(json.dumps({"clips": clips, "seconds_1_worker": round(seconds_1, 2), "seconds_2_workers": round(seconds_2, 2),
                          "shard_speedup": round(seconds_1 / seconds_2, 3), "sharded_equals_unsharded": equal,
                          "differing_outcomes": differing, "outcomes": clips * len(a["outcome"][0])}))
    finally:
        for w in workers:
            stop_worker(w)
        server.should_exit = True


if __name__ == "__main__":
    main()
