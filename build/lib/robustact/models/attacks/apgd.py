"""APGD-CE and APGD-DLR, L-inf, multimodal (Croce & Hein, ICML 2020, "Reliable evaluation
of adversarial robustness with an ensemble of diverse parameter-free attacks").

Per clip: start at ``clip01(x + ε·t/‖t‖∞)``, t ~ U[-1, 1]^d per modality; step size
η = 2ε per modality, scaled by one per-clip factor (the loss is shared); momentum
``z = P(x_k + η·sign(∇)), x_{k+1} = P(x_k + 0.75(z − x_k) + 0.25(x_k − x_{k−1}))`` (the first
step without). Checkpoints after ``⌊0.22N⌋`` iterations, then every ``max(w − ⌊0.03N⌋, ⌊0.06N⌋)``
(for N = 100: 22, 41, 57, 70, 80, 87, 93, 99). At a checkpoint a clip's factor halves if
(C1) its loss rose in at most ρ = 0.75 of the window's steps, or (C2) it was not halved at
the previous checkpoint and its best loss has not improved since; it then jumps back to its
best-loss point and gradient. The window bookkeeping follows the reference implementation
(fra31/auto-attack, torchattacks), including its zero-initialised loss history.

Losses (maximised): cross-entropy, or the untargeted DLR loss
``-(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e−12)`` (≥ 3 classes).

A clip counts as broken at the first misclassified iterate, which is what is returned for
it; a clip never broken gets its best-loss point. Broken clips leave the batch.
"""

from __future__ import annotations

import torch

from ..config import AttackConfig
from .common import AttackResult, RandomStreams, Threat, Tracker, gradients, loss_function


def checkpoints(n_iter: int) -> list[int]:
    """Iteration counts after which the step size is reconsidered: 22, 41, 57, 70, 80, 87,
    93, 99 for 100 iterations (p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)
    in integer form, as the reference implementation computes it)."""
    window = max(int(0.22 * n_iter), 1)
    min_window, decrease = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, at = [], window
    while at <= n_iter:
        out.append(at)
        window = max(window - decrease, min_window)
        at += window
    return out


def random_start(threat: Threat, streams: RandomStreams) -> dict[str, torch.Tensor]:
    """``clip01(x + ε·t/‖t‖∞)`` per clip and modality, t ~ U[-1, 1]."""
    start = {}
    for k in threat.active:
        x0 = threat.x0[k]
        t = streams.rand(x0.shape[1:], dtype=x0.dtype).to(x0.device).mul_(2).sub_(1)
        t_max = t.flatten(1).abs().max(dim=1).values.view(-1, *([1] * (x0.dim() - 1)))
        start[k] = (x0 + threat.eps[k] * t / t_max).clamp_(0.0, 1.0)
    return start


def _scaled(eta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return eta.view(-1, *([1] * (like.dim() - 1)))


def apgd_attack(model, threat: Threat, labels: torch.Tensor, cfg: AttackConfig, streams: RandomStreams,
                track: bool = True, start: dict[str, torch.Tensor] | None = None, rho: float = 0.75) -> AttackResult:
    """One APGD run (restarts are the caller's). ``start`` overrides the random start (tests
    use it to replay a reference implementation's draw)."""
    loss_fn = loss_function(cfg)
    n_iter = cfg.steps
    checks = checkpoints(n_iter)

    x = dict(start) if start is not None else random_start(threat, streams)
    tracker = Tracker(threat, labels)
    logits, loss, grad = gradients(model, threat, x, labels, loss_fn)
    grad = {k: torch.zeros_like(x[k]) if g is None else g for k, g in grad.items()}
    state = {"x": x, "x_old": {k: v.clone() for k, v in x.items()}, "grad": grad,
             "x_best": {k: v.clone() for k, v in x.items()}, "grad_best": {k: v.clone() for k, v in grad.items()}}
    per_clip = {"loss_best": loss.clone(), "eta": torch.full_like(loss, 2.0),
                "loss_best_last": loss.clone(), "reduced_last": torch.ones_like(loss, dtype=torch.bool)}
    history = torch.zeros(n_iter, len(labels), dtype=loss.dtype, device=loss.device)

    def shrink(keep: torch.Tensor) -> None:
        nonlocal threat, labels, history
        if keep.all():
            return
        threat, labels = threat.take(keep), labels[keep]
        for name, tensors in state.items():
            state[name] = {k: v[keep] for k, v in tensors.items()}
        for name, v in per_clip.items():
            per_clip[name] = v[keep]
        history = history[:, keep]

    shrink(tracker.record(logits.argmax(1) != labels, state["x"], 0))
    last_check = 0
    for i in range(n_iter):
        if not len(labels):
            break
        with torch.no_grad():
            x, x_old, momentum = state["x"], state["x_old"], 0.75 if i > 0 else 1.0
            new = {}
            for k in threat.active:
                step = _scaled(per_clip["eta"], x[k]) * threat.eps_scalar[k]
                z = threat.project(k, x[k] + step * state["grad"][k].sign())
                new[k] = threat.project(k, x[k] + (z - x[k]) * momentum + (x[k] - x_old[k]) * (1 - momentum))
            state["x_old"] = x
            state["x"] = new
        logits, loss, grad = gradients(model, threat, state["x"], labels, loss_fn)
        state["grad"] = {k: torch.zeros_like(state["x"][k]) if g is None else g for k, g in grad.items()}
        keep = tracker.record(logits.argmax(1) != labels, state["x"], i + 1)
        loss = loss[keep]
        shrink(keep)
        if not len(labels):
            break
        with torch.no_grad():
            history[i] = loss
            improved = loss > per_clip["loss_best"]
            for k in threat.active:
                state["x_best"][k][improved] = state["x"][k][improved]
                state["grad_best"][k][improved] = state["grad"][k][improved]
            per_clip["loss_best"] = torch.where(improved, loss, per_clip["loss_best"])
            if i + 1 in checks:
                window = i + 1 - last_check
                # Python's negative index wraps to the (still zero) last row at the first
                # checkpoint, as in the reference implementation.
                rises = sum((history[i - c] > history[i - c - 1]).to(torch.long) for c in range(window))
                oscillating = rises <= window * rho
                stalled = ~per_clip["reduced_last"] & (per_clip["loss_best_last"] >= per_clip["loss_best"])
                halve = oscillating | stalled
                per_clip["reduced_last"] = halve.clone()
                per_clip["loss_best_last"] = per_clip["loss_best"].clone()
                if halve.any():
                    per_clip["eta"] = torch.where(halve, per_clip["eta"] / 2, per_clip["eta"])
                    for k in threat.active:
                        state["x"][k][halve] = state["x_best"][k][halve]
                        state["grad"][k][halve] = state["grad_best"][k][halve]
                last_check = i + 1
    tracker.finish(state["x_best"])
    if not track:
        return AttackResult(tracker.out.get("rgb"), tracker.out.get("skel"))
    return AttackResult(tracker.out.get("rgb"), tracker.out.get("skel"), tracker.broken, tracker.iterate)
