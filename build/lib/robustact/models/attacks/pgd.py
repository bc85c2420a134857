"""FGSM, PGD-k and CW-k, L-inf, multimodal.

* FGSM (Goodfellow et al., ICLR 2015): one step of size ε along the sign of the CE
  gradient, from the clean input.
* PGD-k (Madry et al., ICLR 2018): k steps of size α along the sign of the CE gradient,
  each projected onto the ε-ball and [0, 1]; uniform random start in the ball.
* CW-k "optimised by PGD" (Carlini & Wagner's margin loss under an L-inf budget, as in the
  MART / TRADES evaluation code): PGD on ``-relu(z_y - max_{j!=y} z_j + κ)``, κ = 50.

Joint mode RS (eq. 7 of the AMR paper): one loss, one backward pass; each modality steps on
the sign of its own gradient with its own α and is projected onto its own ε-ball.

Inputs ``rgb`` (B, 3, T, H, W) and ``skel`` (B, 3, T, V, M) in [0, 1]; labels (B,) int64.
With ``track`` the iterate that first misclassifies a clip is kept and the clip leaves the
batch (examples are independent in eval mode, so the others' trajectories do not change).
"""

from __future__ import annotations

import torch

from ..config import AttackConfig
from .common import AttackResult, RandomStreams, Threat, Tracker, gradients, loss_function, uniform_start


def pgd_attack(model, threat: Threat, labels: torch.Tensor, cfg: AttackConfig, streams: RandomStreams,
               track: bool) -> AttackResult:
    if cfg.name == "fgsm":
        steps, random_start = 1, False
        alpha = dict(threat.eps_scalar)
    else:
        steps, random_start = cfg.steps, cfg.random_start
        alpha = {"rgb": cfg.alpha_rgb, "skel": cfg.alpha_skel}
    loss_fn = loss_function(cfg)
    adv = {k: uniform_start(threat, k, streams) if random_start else threat.x0[k].clone() for k in threat.active}
    tracker = Tracker(threat, labels) if track else None
    done = 0
    for it in range(steps):
        logits, _, grads = gradients(model, threat, adv, labels, loss_fn)
        if tracker is not None:
            keep = tracker.record(logits.argmax(1) != labels, adv, it)
            if not keep.all():
                threat, labels = threat.take(keep), labels[keep]
                adv = {k: v[keep] for k, v in adv.items()}
                grads = {k: None if g is None else g[keep] for k, g in grads.items()}
        if not len(labels) or all(g is None for g in grads.values()):
            break  # all broken, or the model ignores every attacked modality
        with torch.no_grad():
            for k, g in grads.items():
                if g is not None:
                    adv[k] = threat.project(k, adv[k] + alpha[k] * g.sign())
        done = it + 1
    if tracker is not None and len(labels) and done == steps:  # the last iterate was never checked
        with torch.no_grad():
            logits = model(*threat.inputs(adv)).logits
        keep = tracker.record(logits.argmax(1) != labels, adv, steps)
        adv = {k: v[keep] for k, v in adv.items()}
    if tracker is None:
        return AttackResult(*threat.inputs(adv))
    tracker.finish(adv)
    return AttackResult(tracker.out.get("rgb"), tracker.out.get("skel"), tracker.broken, tracker.iterate)
