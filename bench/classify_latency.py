"""Latency of ``POST /v1/models/{id}/classify`` for the tiny preset, under 1 and 16
concurrent clients, beside the bare model's forward time on the same decoded input; then
the same 16-client load with 4 of the clients sending hostile uploads (a 6 MB skeleton
declaring 2,000,001 frames, a 100,000-frame video, a 4096x4096 video, a chunked 100 MB
body), to see what they cost the 12 honest ones.

The API runs in its own process (uvicorn, embedded settings in a temp directory); the
model is a tiny-preset fusion network with 3 AMRs (weights as initialised: latency does
not depend on them); the clip is a synthetic NTU-layout sample (32 frames of 64x48 AVI +
its ``.skeleton`` file), uploaded as multipart like ``curl -F``.

    python bench/classify_latency.py [--requests 40] [--clients 16] [--torch-threads N]

The last line printed is one JSON object: p50_ms_1, p99_ms_1, p50_ms_16, p99_ms_16,
bare_forward_ms, throughput_rps_1, throughput_rps_16, throughput_ratio_16_vs_1,
overhead_ratio_p50_1 (p50 latency at 1 client / bare forward), and for the run with bombs
honest_p50_ms_bombs, honest_p99_ms_bombs, honest_errors_bombs, errors_clean,
p99_ratio_bombs_vs_clean (honest p99 with bombs / p99 of the clean 16-client run),
bomb_statuses, api_rss_mb_before / api_rss_mb_peak.
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
    from robustact.models.checkpoint import save_checkpoint
    from robustact.models.config import TrainConfig, preset_config
    from robustact.models.data import ntu
    from robustact.models.data.synth import synthesize
    from robustact.models.fusion import build_model
    from robustact.service.db import make_engine, make_sessionmaker, migrate
    from robustact.service.settings import Settings
    from robustact.service.store import open_store
    from robustact.worker.tasks import add_model

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
    from robustact.service.auth import create_key

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

    from robustact.models.checkpoint import load_checkpoint
    from robustact.service.classify import LoadedModel, Upload, decode_skeleton, decode_video
    from robustact.models.config import ModelConfig

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


def run_clients(url: str, key: str, model_id: str, video: bytes, skeleton: bytes, clients: int,
                per_client: int) -> tuple[list[float], float, list[str]]:
    """Latencies (ms) of every request, the wall time of the whole run and the errors."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
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
    return latencies, wall, errors


def make_bombs(directory: Path, video: bytes, skeleton: bytes) -> list[tuple[str, object]]:
    """(name, files or None for the chunked body) of each hostile upload, each beside an
    honest clip of the other modality (a fusion model needs both, and would refuse a lone
    bomb before decoding it); the writers are the tests' own."""
    from tests.service.test_uploads import encode_video, skeleton_bomb

    honest_video = ("clip.avi", video, "video/x-msvideo")
    honest_skeleton = ("clip.skeleton", skeleton, "text/plain")
    many = encode_video(directory / "many.mp4", 100_000, 16, 16).read_bytes()
    huge = encode_video(directory / "huge.mp4", 2, 4096, 4096).read_bytes()  # within the default limits
    return [
        ("skeleton-bomb", {"video": honest_video,
                           "skeleton": ("bomb.skeleton", skeleton_bomb(skeleton.decode()), "text/plain")}),
        ("100k-frames", {"video": ("many.mp4", many, "video/mp4"), "skeleton": honest_skeleton}),
        ("4096x4096", {"video": ("huge.mp4", huge, "video/mp4"), "skeleton": honest_skeleton}),
        ("chunked-100MB", None),
    ]


def chunked_body():
    yield (b'--x\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
           b"Content-Type: video/mp4\r\n\r\n")
    chunk = b"\0" * (1 << 20)
    for _ in range(100):
        yield chunk


def run_bombers(url: str, key: str, model_id: str, bombs, stop: threading.Event) -> dict[str, dict[int, int]]:
    """One client per bomb, each sending it again and again until ``stop``; counts of the
    answers' status codes per bomb."""
    statuses: dict[str, dict[int, int]] = {name: {} for name, _ in bombs}

    def bomber(name: str, files) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
            while not stop.is_set():
                try:
                    if files is None:
                        r = http.post(f"/v1/models/{model_id}/classify", content=chunked_body(),
                                      headers={"Content-Type": "multipart/form-data; boundary=x"})
                    else:
                        r = http.post(f"/v1/models/{model_id}/classify", files=files)
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0  # connection error
                statuses[name][code] = statuses[name].get(code, 0) + 1

    threads = [threading.Thread(target=bomber, args=bomb, daemon=True) for bomb in bombs]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(120)
    return statuses


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, default=16, help="the concurrent level compared with 1")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="ROBUSTACT_API_TORCH_THREADS of the API (0: torch's default, one per core)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="robustact-bench-") as tmp:
        data_dir = Path(tmp)
        model_id, checkpoint, video, skeleton, key = setup(data_dir)
        bombs = make_bombs(data_dir, video, skeleton)
        port = free_port()
        env = {**os.environ, "ROBUSTACT_DATA_DIR": str(data_dir), "ROBUSTACT_SEED_DATASET": "false",
               "ROBUSTACT_API_TORCH_THREADS": str(args.torch_threads), "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "robustact.service.app:create_app", "--factory",
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
            run_clients(url, key, model_id, video, skeleton, 1, 3)  # load the model, warm up
            lat1, wall1, errors1 = run_clients(url, key, model_id, video, skeleton, 1, args.requests)
            per_client = max(3, round(args.requests / args.clients))
            lat16, wall16, errors16 = run_clients(url, key, model_id, video, skeleton, args.clients, per_client)
            if errors1 or errors16:
                raise SystemExit(f"{len(errors1) + len(errors16)} failed requests in the clean runs, first: "
                                 f"{(errors1 + errors16)[0]}")
            # The same load, 4 of the 16 clients replaced by bombers (honest clients send as many
            # requests in all as the clean run's 16 did).
            honest = args.clients - len(bombs)
            rss_before, peak = rss_mb(server.pid), [0.0]
            stop = threading.Event()
            statuses: dict = {}
            bombers = threading.Thread(target=lambda: statuses.update(run_bombers(url, key, model_id, bombs, stop)))
            bombers.start()

            def watch() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_mb(server.pid))
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch)
            watcher.start()
            time.sleep(1.0)  # the bombs are in flight
            per_honest = max(3, round(len(lat16) / honest))
            lat_b, wall_b, errors_b = run_clients(url, key, model_id, video, skeleton, honest, per_honest)
            stop.set()
            bombers.join()
            watcher.join()
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
        "honest_clients_bombs": honest, "requests_bombs": len(lat_b),
        "honest_p50_ms_bombs": round(percentile(lat_b, 50), 2), "honest_p99_ms_bombs": round(percentile(lat_b, 99), 2),
        "honest_errors_bombs": len(errors_b), "errors_clean": len(errors1) + len(errors16),
        "bomb_statuses": {name: {str(k): v for k, v in sorted(codes.items())} for name, codes in statuses.items()},
        "api_rss_mb_before": round(rss_before, 1), "api_rss_mb_peak": round(peak[0], 1),
    }
    result["p99_ratio_bombs_vs_clean"] = round(result["honest_p99_ms_bombs"] / result["p99_ms_16"], 2)
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
    print(f"  {honest} honest + {len(bombs)} bombers  p50 {result['honest_p50_ms_bombs']:8.2f} ms  "
          f"p99 {result['honest_p99_ms_bombs']:8.2f} ms  honest errors {len(errors_b)} (clean runs: "
          f"{result['errors_clean']}); p99 with bombs / clean p99 at 16 clients: "
          f"{result['p99_ratio_bombs_vs_clean']:.2f}x")
    print(f"  bombs answered: {json.dumps(result['bomb_statuses'])}; API resident memory "
          f"{result['api_rss_mb_before']:.0f} MiB before, {result['api_rss_mb_peak']:.0f} MiB peak")
    if errors_b:
        print(f"  first honest error: {errors_b[0]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
