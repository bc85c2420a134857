"""Square attack, L-inf, score-based, multimodal (Andriushchenko et al., ECCV 2020, "Square
Attack: a query-efficient black-box adversarial attack via random search").

Reads logits only: no gradient, so gradient masking cannot hide a clip from it.
Loss: the margin ``z_y − max_{j≠y} z_j``, minimised; a candidate is kept when it lowers a
clip's margin (or misclassifies it); a clip stops once misclassified. ``steps`` is the query
budget per clip, the initial point included.

Our multimodal choices (the paper is about images):

* RGB (3, T, H, W). Start: vertical stripes, ±ε per (channel, column), constant over height
  and time. A window is a box over (T, H, W) of volume fraction p (side fraction p^(1/3) on
  each axis) whose perturbation is set to ±ε per channel.
* Skeleton (3, T, V, M) has no pixel grid: a window is a block of frames (fraction p of
  T) × one joint group × one body present in the clip, set to ±ε per channel. Joint groups
  are the body parts for NTU's 25 joints (torso + head, left arm + hand, right arm + hand,
  left leg, right leg) and contiguous fifths otherwise. Start: ±ε per (channel, joint, body),
  constant over time. Absent bodies are never touched unless the config allows it.
* RS moves one window in each modality per query.
* p starts at 0.8 and halves on AutoAttack's schedule, rescaled to the budget (the steps at
  10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000).

All random draws (windows, signs) come from the clip's own stream, so a clip's result does
not depend on its batch.
"""

from __future__ import annotations


import torch

from ..config import AttackConfig
from .common import AttackResult, RandomStreams, Threat, Tracker, margin

P_INIT = 0.8
NTU_BODY_PARTS = ((0, 1, 2, 3, 20), (4, 5, 6, 7, 21, 22), (8, 9, 10, 11, 23, 24), (12, 13, 14, 15),
                  (16, 17, 18, 19))


def p_schedule(query: int, budget: int, p_init: float = P_INIT) -> float:
    """Fraction of the input a window covers at ``query`` (AutoAttack's schedule, rescaled)."""
    it = int(query / budget * 10000)
    for threshold, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
                               (200, 8), (50, 4), (10, 2)):
        if it > threshold:
            return p_init / divisor
    return p_init


def joint_groups(joints: int) -> list[list[int]]:
    if joints == 25:
        return [list(g) for g in NTU_BODY_PARTS]
    parts = min(5, joints)
    bounds = [round(i * joints / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _side(fraction: float, size: int) -> int:
    return min(max(int(round(fraction * size)), 1), size)


def _rgb_window(streams: RandomStreams, clip: int, shape, p: float, eps: float) -> torch.Tensor:
    c, t, h, w = shape
    frac = p ** (1 / 3)
    st, sh, sw = _side(frac, t), _side(frac, h), _side(frac, w)
    t0, h0, w0 = (streams.randint(clip, n - s + 1) for n, s in ((t, st), (h, sh), (w, sw)))
    delta = torch.zeros(shape)
    delta[:, t0:t0 + st, h0:h0 + sh, w0:w0 + sw] = 2 * eps * streams.signs(clip, (c, 1, 1, 1))
    return delta


def _skel_window(streams: RandomStreams, clip: int, shape, p: float, eps: float, groups,
                 bodies: list[int]) -> torch.Tensor:
    c, t, v, m = shape
    delta = torch.zeros(shape)
    if not bodies:
        return delta
    st = _side(p, t)
    t0 = streams.randint(clip, t - st + 1)
    group = groups[streams.randint(clip, len(groups))]
    body = bodies[streams.randint(clip, len(bodies))]
    sign = streams.signs(clip, (c, 1, 1))
    delta[:, t0:t0 + st, group, body] = 2 * eps * sign
    return delta


def square_attack(model, threat: Threat, labels: torch.Tensor, cfg: AttackConfig, streams: RandomStreams,
                  track: bool = True) -> AttackResult:
    budget = cfg.steps
    batch = len(labels)
    device = labels.device
    x0 = threat.x0
    groups = joint_groups(x0["skel"].shape[3])
    # Bodies the attack may touch, per clip.
    t_skel, persons = x0["skel"].shape[2], x0["skel"].shape[4]
    bodies = []
    for i in range(batch):
        if "skel" not in threat.active:
            bodies.append([])
            continue
        allowed = (threat.eps["skel"][i].expand(1, t_skel, 1, persons) > 0).reshape(t_skel, persons).any(dim=0)
        bodies.append([m for m in range(persons) if allowed[m]])

    # Initial point: stripes.
    best = {}
    for k in threat.active:
        shape = x0[k].shape[1:]
        stripe_shape = (shape[0], 1, 1, shape[3]) if k == "rgb" else (shape[0], 1, shape[2], shape[3])
        signs = torch.stack([streams.signs(i, stripe_shape) for i in range(batch)]).to(device)
        best[k] = threat.project(k, x0[k] + threat.eps[k] * signs)
    tracker = Tracker(threat, labels)
    alive = torch.arange(batch, device=device)  # positions into this call's batch, for the streams
    with torch.no_grad():
        logits = model(*threat.inputs(best)).logits
    best_margin = margin(logits, labels)
    keep = tracker.record(logits.argmax(1) != labels, best, 1)

    def shrink(keep: torch.Tensor) -> None:
        nonlocal threat, labels, best, best_margin, alive
        if keep.all():
            return
        threat, labels, alive, best_margin = threat.take(keep), labels[keep], alive[keep], best_margin[keep]
        best = {k: v[keep] for k, v in best.items()}

    shrink(keep)
    for query in range(1, budget):
        if not len(labels):
            break
        p = p_schedule(query - 1, budget)
        candidate = {}
        for k in threat.active:
            deltas = []
            for j, clip in enumerate(alive.tolist()):
                shape = tuple(best[k].shape[1:])
                if k == "rgb":
                    deltas.append(_rgb_window(streams, clip, shape, p, threat.eps_scalar[k]))
                else:
                    deltas.append(_skel_window(streams, clip, shape, p, threat.eps_scalar[k], groups, bodies[clip]))
            candidate[k] = threat.project(k, best[k] + torch.stack(deltas).to(device))
        with torch.no_grad():
            logits = model(*threat.inputs(candidate)).logits
        cand_margin = margin(logits, labels)
        hit = logits.argmax(1) != labels
        better = (cand_margin < best_margin) | hit
        for k in threat.active:
            best[k][better] = candidate[k][better]
        best_margin = torch.where(better, cand_margin, best_margin)
        shrink(tracker.record(hit, best, query + 1))
    tracker.finish(best)
    if not track:
        return AttackResult(tracker.out.get("rgb"), tracker.out.get("skel"))
    return AttackResult(tracker.out.get("rgb"), tracker.out.get("skel"), tracker.broken, tracker.iterate)
