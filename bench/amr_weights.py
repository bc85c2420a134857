"""Do the AMR weights move? Four AMR variants trained side by side on the reproduce set.

Issue 11, item 4: with weight decay on θ, W = σ(θ) stayed at 0.4998–0.5022 after 20 epochs.
This trains, with the reproduce recipe (tiny preset, Adam lr 0.001, PGD-10 adversarial
training at 8/255, 3 AMRs), on the reproduce's synthetic set:

* ``sigmoid+decay``   W = σ(θ), θ = 0 at start, weight decay on θ (the old default);
* ``sigmoid``         the same without decay on θ (the default now);
* ``identity``        W = θ from 0.5, projected onto [0, 1] after every step;
* ``frozen``          W fixed at 0.5 (``amr-frozen``: the objective alone);
* ``sigmoid-lr10``, ``identity-lr10``: θ at 10× the learning rate.

For each: the mean of every AMR's W_R and W_s, how far the weights moved from 0.5 (mean
and largest |W − 0.5| over all entries), clean accuracy, PGD20 and CW30 accuracy per mode
and the worst case over both at ε = 8/255 on the X-Sub test clips.

    python bench/amr_weights.py [--epochs 20] [--seed 0] [--out DIR]

Last line: one JSON object, per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "sigmoid+decay": {"defence": "amr", "amr_activation": "sigmoid", "amr_init": 0.0, "amr_weight_decay": True},
    "sigmoid": {"defence": "amr", "amr_activation": "sigmoid", "amr_init": 0.0, "amr_weight_decay": False},
    "identity": {"defence": "amr", "amr_activation": "identity", "amr_init": 0.5, "amr_weight_decay": False},
    "frozen": {"defence": "amr-frozen", "amr_activation": "sigmoid", "amr_init": 0.0, "amr_weight_decay": False},
    "sigmoid-lr10": {"defence": "amr", "amr_activation": "sigmoid", "amr_init": 0.0, "amr_weight_decay": False,
                     "amr_lr_scale": 10.0},
    "identity-lr10": {"defence": "amr", "amr_activation": "identity", "amr_init": 0.5, "amr_weight_decay": False,
                      "amr_lr_scale": 10.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp directory)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    import torch

    from robustact.models.checkpoint import load_checkpoint
    from robustact.models.config import AttackConfig, TrainConfig, preset_config
    from robustact.models.data.cache import ClipDataset, prepare
    from robustact.models.data.synth import synthesize
    from robustact.models.evaluate import build_suite, evaluate
    from robustact.models.reproduce import PRESET, ReproducePlan
    from robustact.models.train import train

    torch.set_num_threads(2)
    plan = ReproducePlan(seed=args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="amr-weights-"))
    raw, cache = out / "raw", out / "cache"
    p = preset_config(PRESET)
    if not (cache / "meta.json").is_file():
        synthesize(raw, num_classes=plan.classes, subjects=plan.subjects, cameras=plan.cameras,
                   replications=plan.replications, frames=plan.frames, seed=plan.seed)
        prepare(raw, cache, rgb_frames=p.rgb_frames, rgb_size=p.rgb_size, skel_frames=p.skel_frames)
    train_set = ClipDataset(cache, protocol="xsub", split="train")
    eps = plan.eps / 255
    suite = build_suite([plan.pgd, plan.cw], ["R", "S", "RS"], [plan.eps])
    results = {}
    for name in args.variants.split(","):
        v = VARIANTS[name]
        model_cfg = preset_config(PRESET, num_classes=len(train_set.class_names), num_amr=plan.num_amr,
                                  amr_activation=v["amr_activation"], amr_init=v["amr_init"])
        train_cfg = TrainConfig(defence=v["defence"], epochs=args.epochs, batch_size=plan.batch_size, lr=plan.lr,
                                optimizer=plan.optimizer, seed=plan.seed, amr_weight_decay=v["amr_weight_decay"],
                                amr_lr_scale=v.get("amr_lr_scale", 1.0),
                                attack=AttackConfig(name="pgd", mode="RS", steps=plan.train_attack_steps,
                                                    eps_rgb=eps, eps_skel=eps, alpha_rgb=2 / 255, alpha_skel=2 / 255))
        t0 = time.perf_counter()
        train(model_cfg, train_cfg, train_set, out / name, preset=PRESET, device="cpu", resume=True)
        seconds = time.perf_counter() - t0
        net, meta = load_checkpoint(out / name / "model")
        test_set = ClipDataset(cache, protocol="xsub", split="test", normalisation=meta["normalisation"])
        if plan.eval_limit and plan.eval_limit < len(test_set):
            test_set = test_set.subset(plan.eval_limit, seed=plan.seed)
        moved, largest = [], 0.0
        for amr in net.amrs:
            for w in amr.effective_weights():
                moved.append((w - 0.5).abs().mean().item())
                largest = max(largest, (w - 0.5).abs().max().item())
        report, _ = evaluate(net, meta, test_set, suite, batch_size=plan.eval_batch_size, seed=plan.seed,
                             device="cpu")
        accuracy = {a["label"]: {m: a["modes"][m]["accuracy"] for m in ("R", "S", "RS")} for a in report["attacks"]}
        worst = report["worst_case"][0]
        results[name] = {
            "amr_means": [{"rgb": round(w["mean_rgb"], 4), "skel": round(w["mean_skel"], 4)}
                          for w in net.amr_weights()],
            "mean_abs_moved": round(sum(moved) / len(moved), 4), "max_abs_moved": round(largest, 4),
            "clean": report["clean"]["accuracy"], "attacks": accuracy,
            "worst_case": {**{m: worst["modes"][m]["accuracy"] for m in ("R", "S", "RS")},
                           "overall": worst["overall"]["accuracy"]},
            "train_seconds": round(seconds, 1)}
        r = results[name]
        print(f"{name:14s} W means {[(a['rgb'], a['skel']) for a in r['amr_means']]}  "
              f"|W-0.5| mean {r['mean_abs_moved']:.4f} max {r['max_abs_moved']:.4f}  clean {r['clean']:.1f}  "
              f"worst R/S/RS {worst['modes']['R']['accuracy']:.1f}/{worst['modes']['S']['accuracy']:.1f}/"
              f"{worst['modes']['RS']['accuracy']:.1f}  ({seconds:.0f} s)", flush=True)
    print(json.dumps({"epochs": args.epochs, "seed": args.seed, "eval_clips": len(test_set), "variants": results}))


if __name__ == "__main__":
    main()
