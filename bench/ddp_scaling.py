"""Data-parallel scaling: 2-process DDP on gloo against 1 process, same global batch.

On the tiny preset (two-stream model, AMR with 3 AMRs and PGD adversarial training by
default) and a synthetic set of random clips, trains the same run twice, side by side in one
invocation: once in 1 process, once as 2 DistributedDataParallel processes (gloo, CPU) each
holding half of every global batch. Both arms use 1 torch thread per process, so on a
2-core machine the 2-process arm uses both cores and the 1-process arm one of them; that is
the comparison data parallelism is about (what a second worker process or GPU buys).

Prints, per arm, the training time (the epochs' own seconds, after start-up) and the wall
time (with process start-up, rendezvous and checkpoint writes), the per-epoch loss, and
``ddp_speedup`` = 1-process training time / 2-process training time (median over
``--repeats``, the arms alternating), and the loss difference after ``epochs × clips / batch``
steps. The losses differ because each process normalises I3D's BatchNorm over its half of
the batch and draws its own dropout masks (the batch order, the attack's random starts and
the averaged gradient are those of one process; see ``models.distributed``).

Last line: one JSON object
``{"ddp_speedup": …, "loss_difference": …, "loss_relative_difference": …, "steps": …, …}``.

Usage: ``python bench/ddp_scaling.py [--clips 64] [--batch 16] [--epochs 2] [--attack-steps 5]
[--defence amr] [--num-amr 3] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from robustact.models.config import AttackConfig, TrainConfig, preset_config
from robustact.models.distributed import train_data_parallel

CLASSES = 10


class RandomClips(torch.utils.data.Dataset):
    """``n`` random clips of the model's input geometry, ``CLASSES`` labels in turn (the
    attributes ``models.train.train`` reads from a ClipDataset)."""

    def __init__(self, cfg, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rgb = torch.rand(n, 3, cfg.rgb_frames, cfg.rgb_size, cfg.rgb_size, generator=g)
        self.skel = torch.rand(n, 3, cfg.skel_frames, cfg.joints, cfg.persons, generator=g)
        self.labels = torch.arange(n) % CLASSES
        self.class_names = [f"class {i}" for i in range(CLASSES)]
        self.skel_min, self.skel_max = [-1.0, -1.0, 2.0], [1.0, 1.0, 4.0]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.rgb[i], self.skel[i], int(self.labels[i])


def run_arm(nproc: int, model_cfg, train_cfg, clips: int, work: Path) -> dict:
    out = work / f"nproc{nproc}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    summary = train_data_parallel(model_cfg, train_cfg, functools.partial(RandomClips, model_cfg, clips), out,
                                  nproc=nproc, device="cpu", threads=1, resume=False)
    wall = time.perf_counter() - t0
    history = summary["history"]
    result = {"nproc": nproc, "train_s": sum(h["seconds"] for h in history), "wall_s": wall,
              "losses": [h["loss"] for h in history]}
    print(f"  {nproc} process{'es' if nproc > 1 else '  '}  training {result['train_s']:7.2f} s   wall "
          f"{wall:7.2f} s   loss per epoch {', '.join(f'{v:.4f}' for v in result['losses'])}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch (each of the 2 processes holds half)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--attack-steps", type=int, default=5, help="PGD steps of the inner maximisation")
    parser.add_argument("--defence", default="amr")
    parser.add_argument("--num-amr", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm, alternating")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary one)")
    args = parser.parse_args()

    model_cfg = preset_config("tiny", num_classes=CLASSES, num_amr=args.num_amr if args.defence == "amr" else 0)
    train_cfg = TrainConfig(defence=args.defence, epochs=args.epochs, batch_size=args.batch,
                            attack=AttackConfig(name="pgd", mode="RS", steps=args.attack_steps))
    steps = args.epochs * (args.clips // args.batch if args.clips > args.batch else 1)
    print(f"torch {torch.__version__}; tiny preset, defence {args.defence}, {args.clips} clips, global batch "
          f"{args.batch}, {args.epochs} epochs = {steps} steps, PGD-{args.attack_steps}; 1 thread per process")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        arms: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.repeats):
            for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                arms[nproc].append(run_arm(nproc, model_cfg, train_cfg, args.clips, work))

    one, two = arms[1], arms[2]
    speedups = [a["train_s"] / b["train_s"] for a, b in zip(one, two)]
    last_one, last_two = one[0]["losses"][-1], two[0]["losses"][-1]
    result = {
        "ddp_speedup": round(statistics.median(speedups), 3),
        "ddp_speedup_wall": round(statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(one, two)), 3),
        "loss_difference": abs(last_two - last_one),
        "loss_relative_difference": abs(last_two - last_one) / abs(last_one),
        "steps": steps,
        "loss_1proc": last_one,
        "loss_2proc": last_two,
        "train_s_1proc": round(statistics.median(a["train_s"] for a in one), 3),
        "train_s_2proc": round(statistics.median(b["train_s"] for b in two), 3),
        "clips": args.clips, "batch": args.batch, "epochs": args.epochs, "defence": args.defence,
        "attack_steps": args.attack_steps, "repeats": args.repeats,
    }
    print(f"ddp_speedup {result['ddp_speedup']:.3f} (training time; {result['ddp_speedup_wall']:.3f} with start-up)   "
          f"loss after {steps} steps: {last_one:.5f} (1 process) vs {last_two:.5f} (2), "
          f"difference {result['loss_difference']:.2e} ({100 * result['loss_relative_difference']:.2f} %)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
