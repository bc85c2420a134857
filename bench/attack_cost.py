"""Cost of the PGD attack against the floor it cannot beat.

For the tiny and the paper preset (two-stream model with 3 AMRs, joint RS attack), prints

* the time of PGD-20 divided by the time of 20 bare forward+backward passes of the same
  batch (gradient of the loss with respect to the inputs only) — target ≤ 1.10; both are
  measured side by side, alternating, in this process, and the median ratio is reported;
* the peak memory of one PGD step above the memory held before it (RSS sampled every
  millisecond on CPU; ``torch.cuda.max_memory_allocated`` on CUDA).

Last line: one JSON object
``{"pgd20_over_bare_tiny": …, "pgd20_over_bare_paper": …, "pgd_step_peak_mb_paper": …}``.

Usage: ``python bench/attack_cost.py [--paper-batch 1] [--tiny-batch 16] [--repeats 3] [--skip-paper]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from robustact.models.attacks import attack, frozen_eval
from robustact.models.checkpoint import resolve_device
from robustact.models.config import AttackConfig, preset_config
from robustact.models.fusion import build_model

STEPS = 20


def bare_passes(model, rgb, skel, labels, steps: int) -> None:
    """``steps`` forward+backward passes, gradient w.r.t. both inputs only."""
    with frozen_eval(model):
        for _ in range(steps):
            r = rgb.detach().requires_grad_(True)
            s = skel.detach().requires_grad_(True)
            loss = F.cross_entropy(model(r, s).logits, labels, reduction="sum")
            torch.autograd.grad(loss, [r, s])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_step_mb(model, rgb, skel, labels, device) -> float:
    """Extra memory at the peak of one PGD step, above what was held just before it."""
    cfg = AttackConfig(name="pgd", mode="RS", steps=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        attack(model, rgb, skel, labels, cfg, seed=0)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attack(model, rgb, skel, labels, cfg, seed=0)
    done.set()
    sampler.join()
    return max(peak[0], _rss_mb()) - before


def measure(preset: str, batch: int, repeats: int, device) -> dict:
    torch.manual_seed(0)
    cfg = preset_config(preset, num_classes=60, num_amr=3)
    model = build_model(cfg).to(device).eval()
    rgb = torch.rand(batch, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, device=device)
    skel = torch.rand(batch, 3, cfg.skel_frames, cfg.joints, cfg.persons, device=device)
    labels = torch.randint(0, 60, (batch,), device=device)
    pgd20 = AttackConfig(name="pgd", mode="RS", steps=STEPS)

    bare_passes(model, rgb, skel, labels, 1)  # warm-up (allocator, kernels)
    memory = peak_step_mb(model, rgb, skel, labels, device)
    ratios, bare_times, pgd_times = [], [], []
    for _ in range(repeats):
        t_bare = _timed(lambda: bare_passes(model, rgb, skel, labels, STEPS), device)
        t_pgd = _timed(lambda: attack(model, rgb, skel, labels, pgd20, seed=0), device)
        bare_times.append(t_bare)
        pgd_times.append(t_pgd)
        ratios.append(t_pgd / t_bare)
    result = {"preset": preset, "batch": batch, "device": str(device), "repeats": repeats,
              "bare20_s": statistics.median(bare_times), "pgd20_s": statistics.median(pgd_times),
              "ratio": statistics.median(ratios), "step_peak_mb": memory}
    print(f"{preset:>5}  batch {batch:>2}  bare×20 {result['bare20_s']:8.2f} s   PGD-20 {result['pgd20_s']:8.2f} s"
          f"   ratio {result['ratio']:.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)})"
          f"   one PGD step +{memory:.0f} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-batch", type=int, default=16)
    parser.add_argument("--paper-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats for the tiny preset")
    parser.add_argument("--paper-repeats", type=int, default=1)
    parser.add_argument("--skip-paper", action="store_true", help="tiny preset only (the paper preset takes minutes on CPU)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    tiny = measure("tiny", args.tiny_batch, args.repeats, device)
    paper = None if args.skip_paper else measure("paper", args.paper_batch, args.paper_repeats, device)
    print(json.dumps({
        "pgd20_over_bare_tiny": round(tiny["ratio"], 4),
        "pgd20_over_bare_paper": None if paper is None else round(paper["ratio"], 4),
        "pgd_step_peak_mb_paper": None if paper is None else round(paper["step_peak_mb"], 1),
    }))


if __name__ == "__main__":
    main()
