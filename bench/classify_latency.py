"""Latency of ``POST /v1/models/{id}/classify`` for the tiny preset, under 1 and 16
concurrent clients, beside the bare model's forward time on the same decoded input.

The API runs in its own process (uvicorn, embedded settings in a temp directory); the
model is a tiny-preset fusion network with 3 AMRs (weights as initialised: latency does
not depend on them); the clip is a synthetic NTU-layout sample (32 frames of 64x48 AVI +
its ``.skeleton`` file), uploaded as multipart like ``curl -F``.

    python bench/classify_latency.py [--requests 40] [--clients 16] [--torch-threads N]

The last line printed is one JSON object: p50_ms_1, p99_ms_1, p50_ms_16, p99_ms_16,
bare_forward_ms, throughput_rps_1, throughput_rps_16, throughput_ratio_16_vs_1,
overhead_ratio_p50_1 (p50 latency at 1 client / bare forward).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(data_dir: Path) -> tuple[str, Path, bytes, bytes, str]:
    """A registered tiny model, one clip and an API key; returns (model id, checkpoint dir,
    video, skeleton, key)."""
    from models.checkpoint import save_checkpoint
    from models.config import TrainConfig, preset_config
    from models.data import ntu
    from models.data.synth import synthesize
    from models.fusion import build_model
    from service.db import make_engine, make_sessionmaker, migrate
    from service.settings import Settings
    from service.store import open_store
    from worker.tasks import add_model

    settings = Settings(data_dir=data_dir, seed_dataset=False)
    migrate(settings.database_url)
    info = synthesize(data_dir / "clip", num_classes=5, subjects=(1,), cameras=(1,), replications=(1,),
                      frames=32, video_size=(64, 48))
    cfg = preset_config("tiny", num_classes=5, num_amr=3)
    checkpoint = data_dir / "checkpoint"
    save_checkpoint(checkpoint, build_model(cfg), {
        "model": cfg.to_dict(), "preset": "tiny", "class_names": info["class_names"],
        "normalisation": {"skel_min": [-1.5, -1.5, 1.5], "skel_max": [1.5, 1.5, 4.5]},
        "train": TrainConfig().to_dict()})
    from service.auth import create_key

    with make_sessionmaker(make_engine(settings.database_url))() as session:
        _, key = create_key(session, "bench", admin=True)
        model = add_model(session, open_store(settings.store_url), checkpoint, "bench-tiny")
        session.commit()
    sample = "S001C001P001R001A001"
    video = (data_dir / "clip" / ntu.RGB_DIR / f"{sample}{ntu.VIDEO_SUFFIX}").read_bytes()
    skeleton = (data_dir / "clip" / ntu.SKELETON_DIR / f"{sample}{ntu.SKELETON_SUFFIX}").read_bytes()
    return model.id, checkpoint, video, skeleton, key


def bare_forward_ms(checkpoint: Path, video: bytes, skeleton: bytes, repeats: int) -> float:
    """Median forward time of the model alone on the decoded clip (same thread count)."""
    import io

    import torch

    from models.checkpoint import load_checkpoint
    from service.classify import LoadedModel, Upload, decode_skeleton, decode_video
    from models.config import ModelConfig

    model, meta = load_checkpoint(checkpoint)
    cfg = ModelConfig.from_dict(meta["model"])
    loaded = LoadedModel(model, meta, cfg, torch.device("cpu"))
    rgb, _ = decode_video(Upload("video", "a.avi", "video/x-msvideo", io.BytesIO(video)), cfg)
    skel, _ = decode_skeleton(Upload("skeleton", "a.skeleton", "text/plain", io.BytesIO(skeleton)), cfg, meta)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            loaded.model(rgb[None], skel[None])
            if i >= 3:  # warm-up excluded
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_clients(url: str, model_id: str, video: bytes, skeleton: bytes, clients: int,
                per_client: int) -> tuple[list[float], float]:
    """Latencies (ms) of every request and the wall time of the whole run."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = http.post(f"/v1/models/{model_id}/classify",
                              files={"video": ("clip.avi", video, "video/x-msvideo"),
                                     "skeleton": ("clip.skeleton", skeleton, "text/plain")})
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, first: {errors[0]}")
    return latencies, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, default=16, help="the concurrent level compared with 1")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="ROBUSTACT_API_TORCH_THREADS of the API (0: torch's default, one per core)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="robustact-bench-") as tmp:
        data_dir = Path(tmp)
        model_id, checkpoint, video, skeleton = setup(data_dir)
        port = free_port()
        env = {**os.environ, "ROBUSTACT_DATA_DIR": str(data_dir), "ROBUSTACT_SEED_DATASET": "false",
               "ROBUSTACT_API_TORCH_THREADS": str(args.torch_threads), "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
                                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                  env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the API did not start")
                time.sleep(0.1)
            run_clients(url, model_id, video, skeleton, 1, 3)  # load the model, warm up
            lat1, wall1 = run_clients(url, model_id, video, skeleton, 1, args.requests)
            per_client = max(3, round(args.requests / args.clients))
            lat16, wall16 = run_clients(url, model_id, video, skeleton, args.clients, per_client)
        finally:
            server.terminate()
            server.wait(30)
        if args.torch_threads > 0:
            import torch

            torch.set_num_threads(args.torch_threads)
        bare = bare_forward_ms(checkpoint, video, skeleton, repeats=args.requests)

    result = {
        "p50_ms_1": round(percentile(lat1, 50), 2), "p99_ms_1": round(percentile(lat1, 99), 2),
        "p50_ms_16": round(percentile(lat16, 50), 2), "p99_ms_16": round(percentile(lat16, 99), 2),
        "bare_forward_ms": round(bare, 2),
        "throughput_rps_1": round(len(lat1) / wall1, 2), "throughput_rps_16": round(len(lat16) / wall16, 2),
        "clients": args.clients, "requests_1": len(lat1), "requests_16": len(lat16),
        "cpu_count": os.cpu_count(), "torch_threads": args.torch_threads,
    }
    result["throughput_ratio_16_vs_1"] = round(result["throughput_rps_16"] / result["throughput_rps_1"], 2)
    result["overhead_ratio_p50_1"] = round(result["p50_ms_1"] / bare, 2)
    print(f"classify, tiny preset (fusion + 3 AMR), {os.cpu_count()} CPU(s)")
    print(f"  bare model forward        {bare:8.2f} ms (median)")
    print(f"  1 client                  p50 {result['p50_ms_1']:8.2f} ms  p99 {result['p99_ms_1']:8.2f} ms  "
          f"{result['throughput_rps_1']:.1f} req/s")
    print(f"  {args.clients} concurrent clients     p50 {result['p50_ms_16']:8.2f} ms  p99 {result['p99_ms_16']:8.2f} ms  "
          f"{result['throughput_rps_16']:.1f} req/s")
    print(f"  service overhead (p50 at 1 client / bare forward): {result['overhead_ratio_p50_1']:.2f}x; "
          f"throughput 16 vs 1: {result['throughput_ratio_16_vs_1']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
