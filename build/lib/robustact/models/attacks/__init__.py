"""Multimodal L-inf attacks on RGB + skeleton models, one file per attack:

* ``pgd.py``    — FGSM, PGD-k, CW-k (CW margin loss optimised by PGD);
* ``apgd.py``   — APGD-CE, APGD-DLR (Croce & Hein 2020);
* ``square.py`` — Square (Andriushchenko et al. 2020), score-based, no gradient;
* ``common.py`` — threat model, losses, per-clip random streams, result record.

Each attack perturbs the RGB clip (mode ``R``), the skeleton (``S``) or both (``RS``); in
the joint mode both modalities move on the same loss, each within its own ε-ball
(eq. 7 of the AMR paper, after Madry et al. and Tian & Xu's multimodal formulation).

One contract for all (``attack`` / ``run_attack``):

* inputs: ``rgb`` (B, 3, T, H, W) and ``skel`` (B, C, T, V, M), both in [0, 1];
  ``labels`` (B,) int64 ground truth;
* the model is switched to eval mode for the attack and restored afterwards; parameter
  gradients are neither computed nor accumulated;
* the inputs are never mutated; the outputs lie in the ε-ball of each modality and in
  [0, 1]; an unattacked modality is returned unchanged (the same tensor); absent skeleton
  bodies (all-zero slots) stay zero unless ``cfg.perturb_absent_bodies``;
* randomness: ``clip_ids`` + ``seed`` give each clip its own stream (batch-independent
  results, used by evaluation); ``seed`` alone seeds one stream for the batch (training);
  ``shard=(start, total)`` with it: the batch is rows start… of a global batch of ``total``
  and gets those rows of the global batch's random start (data-parallel training);
* ``cfg.restarts`` > 1 re-runs the attack on the clips not yet broken, each restart from a
  new random start, and keeps the first adversarial point found.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch

from ..config import AttackConfig
from .apgd import apgd_attack
from .common import (AttackResult, RandomStreams, clip_seed, cw_margin_loss, dlr_loss, frozen_eval, margin,
                     threat_model)
from .pgd import pgd_attack
from .square import square_attack

__all__ = ["attack", "run_attack", "fgsm", "pgd", "cw", "apgd", "square", "entry_key", "AttackResult",
           "frozen_eval", "cw_margin_loss", "dlr_loss", "margin", "clip_seed"]

_IMPLEMENTATIONS = {"fgsm": pgd_attack, "pgd": pgd_attack, "cw": pgd_attack, "apgd-ce": apgd_attack,
                    "apgd-dlr": apgd_attack, "square": square_attack}


def entry_key(cfg: AttackConfig) -> str:
    """A stable text key of an attack config: the random streams of a clip depend on it (and
    not on the entry's position in a suite), so reordering a suite changes no result. The
    restart count is left out, so restart 0 of an N-restart run is the single run."""
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k != "restarts"}, sort_keys=True)


def run_attack(model, rgb: torch.Tensor, skel: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, *,
               seed: int | None = None, clip_ids: Sequence[int] | None = None, track: bool = True,
               shard: tuple[int, int] | None = None) -> AttackResult:
    """Run ``cfg`` on a batch; see the module docstring for the contract. With ``track``,
    the result says which clips some iterate misclassified, at which iterate and restart."""
    if cfg.name == "apgd-dlr" and model_classes(model) is not None and model_classes(model) < 3:
        raise ValueError("apgd-dlr needs at least 3 classes")
    batch = labels.shape[0]
    probe = threat_model(rgb, skel, cfg)
    if not probe.active or batch == 0:
        empty = torch.zeros(batch, dtype=torch.bool, device=labels.device)
        none = torch.full((batch,), -1, dtype=torch.long, device=labels.device)
        return AttackResult(rgb, skel, empty if track else None, none if track else None, none if track else None)
    implementation = _IMPLEMENTATIONS[cfg.name]
    key = entry_key(cfg)
    out = {"rgb": rgb.detach().clone() if "rgb" in probe.active else rgb,
           "skel": skel.detach().clone() if "skel" in probe.active else skel}
    broken = torch.zeros(batch, dtype=torch.bool, device=labels.device)
    iterate = torch.full((batch,), -1, dtype=torch.long, device=labels.device)
    restart = torch.full((batch,), -1, dtype=torch.long, device=labels.device)
    remaining = torch.arange(batch, device=labels.device)
    restarts = cfg.restarts if track else 1
    with frozen_eval(model):
        for r in range(restarts):
            if clip_ids is not None:
                base = 0 if seed is None else seed
                streams = RandomStreams(len(remaining), clip_seeds=[clip_seed(base, int(clip_ids[i]), key, r)
                                                                    for i in remaining.tolist()])
            else:
                streams = RandomStreams(len(remaining), seed=seed if r == 0 or seed is None
                                        else clip_seed(seed, -1, key, r), shard=shard if r == 0 else None)
            threat = probe if r == 0 else probe.take(remaining)
            result = implementation(model, threat, labels[remaining], cfg, streams, track)
            for k in probe.active:
                out[k][remaining] = getattr(result, k)
            if not track:
                return AttackResult(out["rgb"], out["skel"])
            hit = result.broken
            broken[remaining[hit]] = True
            iterate[remaining[hit]] = result.iterate[hit]
            restart[remaining[hit]] = r
            remaining = remaining[~hit]
            if not len(remaining):
                break
    return AttackResult(out["rgb"], out["skel"], broken, iterate, restart)


def model_classes(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "num_classes", None)


def attack(model, rgb, skel, labels, cfg: AttackConfig, seed: int | None = None,
           shard: tuple[int, int] | None = None):
    """The adversarial ``(rgb, skel)`` of ``cfg`` for a batch, one random stream seeded by
    ``seed`` (None: fresh entropy). The training loop's inner maximisation uses it: the last
    iterate, no success tracking. ``shard``: see the module docstring."""
    result = run_attack(model, rgb, skel, labels, cfg, seed=seed, track=False, shard=shard)
    return result.rgb, result.skel


def fgsm(model, rgb, skel, labels, *, mode="RS", eps_rgb=8 / 255, eps_skel=8 / 255):
    """FGSM (Goodfellow et al., ICLR 2015), L-inf: one step of size eps along the sign of
    the cross-entropy gradient, from the clean input. Returns ``(adv_rgb, adv_skel)``."""
    cfg = AttackConfig(name="fgsm", mode=mode, steps=1, eps_rgb=eps_rgb, eps_skel=eps_skel, random_start=False)
    return attack(model, rgb, skel, labels, cfg)


def pgd(model, rgb, skel, labels, *, mode="RS", steps=20, eps_rgb=8 / 255, eps_skel=8 / 255,
        alpha_rgb=2 / 255, alpha_skel=2 / 255, random_start=True, seed=None):
    """PGD-k (Madry et al., ICLR 2018), L-inf, cross-entropy loss, uniform random start.
    Defaults: 20 steps, ε = 8/255, α = 2/255 per modality."""
    cfg = AttackConfig(name="pgd", mode=mode, steps=steps, eps_rgb=eps_rgb, eps_skel=eps_skel,
                       alpha_rgb=alpha_rgb, alpha_skel=alpha_skel, random_start=random_start)
    return attack(model, rgb, skel, labels, cfg, seed=seed)


def cw(model, rgb, skel, labels, *, mode="RS", steps=30, eps_rgb=8 / 255, eps_skel=8 / 255,
       alpha_rgb=2 / 255, alpha_skel=2 / 255, kappa=50.0, random_start=True, seed=None):
    """CW-k "optimised by PGD" (MART / TRADES evaluation code): PGD steps that maximise
    ``-relu(z_y - max_{j != y} z_j + kappa)``. Defaults: 30 steps, κ = 50."""
    cfg = AttackConfig(name="cw", mode=mode, steps=steps, eps_rgb=eps_rgb, eps_skel=eps_skel,
                       alpha_rgb=alpha_rgb, alpha_skel=alpha_skel, random_start=random_start, cw_kappa=kappa)
    return attack(model, rgb, skel, labels, cfg, seed=seed)


def apgd(model, rgb, skel, labels, *, mode="RS", loss="ce", steps=100, eps_rgb=8 / 255, eps_skel=8 / 255,
         restarts=1, seed=None):
    """APGD (Croce & Hein, ICML 2020) with the CE or the DLR loss; step sizes are its own."""
    cfg = AttackConfig(name=f"apgd-{loss}", mode=mode, steps=steps, eps_rgb=eps_rgb, eps_skel=eps_skel,
                       restarts=restarts)
    return attack(model, rgb, skel, labels, cfg, seed=seed)


def square(model, rgb, skel, labels, *, mode="RS", queries=5000, eps_rgb=8 / 255, eps_skel=8 / 255, seed=None):
    """Square (Andriushchenko et al., ECCV 2020), score-based, ``queries`` per clip."""
    cfg = AttackConfig(name="square", mode=mode, steps=queries, eps_rgb=eps_rgb, eps_skel=eps_skel)
    return attack(model, rgb, skel, labels, cfg, seed=seed)
