"""Multimodal L-inf attacks on RGB + skeleton models: FGSM, PGD-k and CW-k.

Each attack perturbs the RGB clip (mode ``R``), the skeleton (``S``) or both (``RS``).
In the joint mode every step moves each modality along the sign of its own gradient of the
same loss and projects it onto its own epsilon-ball (eq. 7 of the AMR paper, after Madry
et al. and Tian & Xu's multimodal formulation).

All attacks share one contract:

* inputs: ``rgb`` (B, 3, T, H, W) and ``skel`` (B, 3, T, V, M), both in [0, 1];
  ``labels`` (B,) int64 ground truth;
* the model is switched to eval mode for the attack and restored afterwards; parameter
  gradients are neither computed nor accumulated;
* the inputs are never mutated; the outputs lie in the epsilon-ball of each modality and
  in [0, 1]; an unattacked modality is returned unchanged (the same tensor);
* with a ``seed`` the random start is reproducible.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .config import AttackConfig


def fgsm(model, rgb, skel, labels, *, mode="RS", eps_rgb=8 / 255, eps_skel=8 / 255):
    """FGSM (Goodfellow et al., ICLR 2015), L-inf: one step of size eps along the sign of
    the cross-entropy gradient, from the clean input.

    Arguments:
        mode (str): "R", "S" or "RS" — which modalities are perturbed.
        eps_rgb, eps_skel (float): L-inf budgets per modality. Default: 8/255.
    Returns: ``(adv_rgb, adv_skel)`` with the shapes of the inputs.
    """
    cfg = AttackConfig(name="fgsm", mode=mode, steps=1, eps_rgb=eps_rgb, eps_skel=eps_skel,
                       random_start=False)
    return attack(model, rgb, skel, labels, cfg)


def pgd(model, rgb, skel, labels, *, mode="RS", steps=20, eps_rgb=8 / 255, eps_skel=8 / 255,
        alpha_rgb=2 / 255, alpha_skel=2 / 255, random_start=True, seed=None):
    """PGD-k (Madry et al., ICLR 2018), L-inf, cross-entropy loss, uniform random start.

    Arguments:
        mode (str): "R", "S" or "RS". steps (int): iterations. Default: 20.
        eps_* (float): budgets per modality. Default: 8/255.
        alpha_* (float): step sizes per modality. Default: 2/255.
        random_start (bool): start from a uniform point of the ball. Default: True.
        seed (int | None): seed of the random start.
    """
    cfg = AttackConfig(name="pgd", mode=mode, steps=steps, eps_rgb=eps_rgb, eps_skel=eps_skel,
                       alpha_rgb=alpha_rgb, alpha_skel=alpha_skel, random_start=random_start)
    return attack(model, rgb, skel, labels, cfg, seed=seed)


def cw(model, rgb, skel, labels, *, mode="RS", steps=30, eps_rgb=8 / 255, eps_skel=8 / 255,
       alpha_rgb=2 / 255, alpha_skel=2 / 255, kappa=50.0, random_start=True, seed=None):
    """CW-k "optimised by PGD" (Carlini & Wagner's margin loss under an L-inf budget, as in
    the MART / TRADES evaluation code): PGD steps that maximise
    ``-relu(z_y - max_{j != y} z_j + kappa)``.

    Arguments: as :func:`pgd`, plus kappa (float): confidence margin. Default: 50.
    """
    cfg = AttackConfig(name="cw", mode=mode, steps=steps, eps_rgb=eps_rgb, eps_skel=eps_skel,
                       alpha_rgb=alpha_rgb, alpha_skel=alpha_skel, random_start=random_start,
                       cw_kappa=kappa)
    return attack(model, rgb, skel, labels, cfg, seed=seed)


def cw_margin_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    """Summed CW margin loss to be *maximised*: ``-relu(z_y - max_{j!=y} z_j + kappa)``."""
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    correct = (one_hot * logits).sum(dim=1)
    # Mask the true class out with a large negative number rather than -inf so that the
    # max stays finite under autograd.
    wrong = (logits - 1e4 * one_hot).max(dim=1).values
    return -F.relu(correct - wrong + kappa).sum()


def _loss(cfg: AttackConfig, logits, labels):
    if cfg.name == "cw":
        return cw_margin_loss(logits, labels, cfg.cw_kappa)
    # Summed, not averaged: the sign step is scale-free, and a sum keeps per-example
    # gradients independent of the batch size.
    return F.cross_entropy(logits, labels, reduction="sum")


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module):
    """Eval mode and no parameter gradients for the duration of an attack."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def _project(x, x0, eps):
    return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def _random_start(x0, eps, generator):
    noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device="cpu")
    noise = noise.to(x0.device).mul_(2 * eps).sub_(eps)
    return (x0 + noise).clamp_(0.0, 1.0)


def attack(model, rgb, skel, labels, cfg: AttackConfig, seed: int | None = None):
    """Run the attack ``cfg`` on a batch; see the module docstring for the contract.

    Arguments:
        model: an ``ActionNet`` (``model(rgb, skel).logits`` gives (B, K) logits).
        rgb (Tensor): (B, 3, T, H, W) in [0, 1]. skel (Tensor): (B, 3, T, V, M) in [0, 1].
        labels (Tensor): (B,) int64.
        cfg (AttackConfig): attack, mode, steps, budgets and step sizes.
        seed (int | None): seed of the random start (PGD, CW). None draws from torch's
            global generator.
    Returns: ``(adv_rgb, adv_skel)``.
    """
    attack_rgb = cfg.mode in ("R", "RS")
    attack_skel = cfg.mode in ("S", "RS")
    x0 = {"rgb": rgb.detach(), "skel": skel.detach()}
    eps = {"rgb": cfg.eps_rgb, "skel": cfg.eps_skel}
    active = [k for k, on in (("rgb", attack_rgb), ("skel", attack_skel)) if on and eps[k] > 0]
    if not active:
        return rgb, skel

    if cfg.name == "fgsm":
        steps, alpha, random_start = 1, dict(eps), False
    else:
        steps, alpha = cfg.steps, {"rgb": cfg.alpha_rgb, "skel": cfg.alpha_skel}
        random_start = cfg.random_start

    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    adv = dict(x0)
    for k in active:
        adv[k] = _random_start(x0[k], eps[k], generator) if random_start else x0[k].clone()

    with frozen_eval(model):
        for _ in range(steps):
            for k in active:
                adv[k] = adv[k].detach().requires_grad_(True)
            logits = model(adv["rgb"], adv["skel"]).logits
            loss = _loss(cfg, logits, labels)
            if not loss.requires_grad:  # the model ignores every attacked modality
                break
            grads = torch.autograd.grad(loss, [adv[k] for k in active], allow_unused=True)
            with torch.no_grad():
                for k, g in zip(active, grads):
                    if g is None:  # a unimodal model ignores this modality
                        adv[k] = adv[k].detach()
                        continue
                    stepped = adv[k] + alpha[k] * g.sign()
                    adv[k] = _project(stepped, x0[k], eps[k])
    out_rgb = adv["rgb"].detach() if attack_rgb else rgb
    out_skel = adv["skel"].detach() if attack_skel else skel
    return out_rgb, out_skel
