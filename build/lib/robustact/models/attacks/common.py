"""What every attack shares: the threat model (per-modality ε-balls inside [0, 1], absent
skeleton bodies left alone), the losses, per-clip random streams, eval-mode freezing and
the result record.

Per-clip randomness. Evaluation passes one seed per clip (``clip_seed(seed, clip, key,
restart)``); every random draw of an attack on that clip (start point, Square's windows and
signs) comes from that clip's own generator, so a clip's result does not depend on the
batch it was in, on the batch size or on the shard. Training passes a single ``seed`` for
the batch instead (one generator for the whole batch, the cheaper draw); a data-parallel rank
holding rows ``start…start+B`` of a global batch of ``total`` passes ``shard=(start, total)``,
and its ``rand`` draws are those rows of the global batch's draw, so a clip's random start is
the one single-process training gives it (``models.distributed``).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..config import AttackConfig

KEYS = ("rgb", "skel")


def clip_seed(seed: int, clip: int, entry_key: str, restart: int = 0) -> int:
    """A 63-bit seed for one clip, one suite entry (its stable key) and one restart."""
    digest = hashlib.blake2b(f"{seed}|{clip}|{entry_key}|{restart}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RandomStreams:
    """Random draws for a batch: one generator per clip, or one shared by the batch.

    ``shard=(start, total)`` (shared stream only): this batch is rows ``start…start+batch`` of a
    global batch of ``total``; ``rand`` draws for all ``total`` rows and returns this batch's.
    """

    def __init__(self, batch: int, seed: int | None = None, clip_seeds: Sequence[int] | None = None,
                 shard: tuple[int, int] | None = None):
        if shard is not None and (clip_seeds is not None or not 0 <= shard[0] <= shard[0] + batch <= shard[1]):
            raise ValueError(f"shard {shard} does not hold a batch of {batch} (or per-clip seeds were given)")
        self.shard = shard
        if clip_seeds is not None:
            if len(clip_seeds) != batch:
                raise ValueError(f"{len(clip_seeds)} clip seeds for a batch of {batch}")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in clip_seeds]
            self.shared = None
        else:
            self.shared = torch.Generator()
            if seed is None:
                self.shared.seed()
            else:
                self.shared.manual_seed(seed)
            self.generators = [self.shared] * batch

    def rand(self, shape_per_clip: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) of shape ``(B, *shape_per_clip)`` on the CPU."""
        if self.shared is not None:
            if self.shard is not None:
                start, total = self.shard
                rows = torch.rand((total, *shape_per_clip), generator=self.shared, dtype=dtype)
                return rows[start:start + len(self.generators)]
            return torch.rand((len(self.generators), *shape_per_clip), generator=self.shared, dtype=dtype)
        return torch.stack([torch.rand(tuple(shape_per_clip), generator=g, dtype=dtype) for g in self.generators])

    def randint(self, clip: int, high: int) -> int:
        """An int in [0, high) from clip ``clip``'s stream."""
        return int(torch.randint(high, (1,), generator=self.generators[clip]))

    def signs(self, clip: int, shape: Sequence[int]) -> torch.Tensor:
        """±1 of ``shape`` from clip ``clip``'s stream."""
        return torch.randint(0, 2, tuple(shape), generator=self.generators[clip]).float().mul_(2).sub_(1)


@dataclass
class AttackResult:
    """Adversarial inputs plus, when the attack tracked success, which clips it broke.

    ``broken[i]``: some iterate of the attack was misclassified; ``rgb[i]``/``skel[i]`` is
    then the first such iterate (never silently dropped). ``iterate[i]``: the iterate (query
    for Square) that broke it, counted from the start point = 0; ``restart[i]``: the restart
    that did; both -1 when not broken. Untracked runs (training) leave ``broken`` None.
    """

    rgb: torch.Tensor
    skel: torch.Tensor
    broken: torch.Tensor | None = None
    iterate: torch.Tensor | None = None
    restart: torch.Tensor | None = None


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


# ------------------------------------------------------------------------------ losses
# Per-example losses to be *maximised* by the attacker.


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def cw_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    """``-relu(z_y - max_{j!=y} z_j + kappa)``."""
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    correct = (one_hot * logits).sum(dim=1)
    # Mask the true class out with a large negative number rather than -inf so that the
    # max stays finite under autograd.
    wrong = (logits - 1e4 * one_hot).max(dim=1).values
    return -F.relu(correct - wrong + kappa)


def cw_margin_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    """Summed CW margin loss to be *maximised*: ``-relu(z_y - max_{j!=y} z_j + kappa)``."""
    return cw_loss(logits, labels, kappa).sum()


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR (Croce & Hein 2020): ``-(z_y - max_{i!=y} z_i) / (z_π1 - z_π3 + 1e-12)``.
    Shift- and scale-invariant; needs at least 3 classes."""
    ordered, order = logits.sort(dim=1)
    top_is_label = (order[:, -1] == labels).to(logits.dtype)
    z_y = logits.gather(1, labels[:, None])[:, 0]
    best_other = ordered[:, -2] * top_is_label + ordered[:, -1] * (1 - top_is_label)
    return -(z_y - best_other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j!=y} z_j``: negative exactly when the clip is misclassified (or tied)."""
    one_hot = F.one_hot(labels, logits.shape[1]).to(torch.bool)
    z_y = logits.gather(1, labels[:, None])[:, 0]
    return z_y - logits.masked_fill(one_hot, float("-inf")).max(dim=1).values


def loss_function(cfg: AttackConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if cfg.name == "cw":
        return lambda logits, labels: cw_loss(logits, labels, cfg.cw_kappa)
    if cfg.name == "apgd-dlr":
        return dlr_loss
    return ce_loss


# ------------------------------------------------------------------------------ threat model


@dataclass
class Threat:
    """The clean inputs of a batch, which modalities the attack moves and each modality's
    per-element budget (ε, or 0 where a skeleton body is absent)."""

    x0: dict[str, torch.Tensor]
    active: list[str]
    eps: dict[str, torch.Tensor]
    eps_scalar: dict[str, float]

    def take(self, index: torch.Tensor) -> "Threat":
        return Threat({k: v[index] for k, v in self.x0.items()}, self.active,
                      {k: v[index] for k, v in self.eps.items()}, self.eps_scalar)

    def project(self, key: str, x: torch.Tensor) -> torch.Tensor:
        x0, eps = self.x0[key], self.eps[key]
        return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)

    def inputs(self, adv: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return adv.get("rgb", self.x0["rgb"]), adv.get("skel", self.x0["skel"])


def body_presence(skel: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, 1, M) float: 1 where body m has any non-zero coordinate in frame t. Absent
    bodies are stored as exact zeros (``models.data.ntu.scale_skeleton``)."""
    return (skel != 0).any(dim=1, keepdim=True).any(dim=3, keepdim=True).to(skel.dtype)


def threat_model(rgb: torch.Tensor, skel: torch.Tensor, cfg: AttackConfig) -> Threat:
    x0 = {"rgb": rgb.detach(), "skel": skel.detach()}
    eps_scalar = {"rgb": float(cfg.eps_rgb), "skel": float(cfg.eps_skel)}
    wanted = {"rgb": cfg.mode in ("R", "RS"), "skel": cfg.mode in ("S", "RS")}
    active = [k for k in KEYS if wanted[k] and eps_scalar[k] > 0]
    ones = (rgb.shape[0],) + (1,) * (rgb.dim() - 1)
    eps = {"rgb": torch.full(ones, eps_scalar["rgb"], dtype=rgb.dtype, device=rgb.device)}
    if cfg.perturb_absent_bodies:
        eps["skel"] = torch.full((skel.shape[0],) + (1,) * (skel.dim() - 1), eps_scalar["skel"],
                                 dtype=skel.dtype, device=skel.device)
    else:
        eps["skel"] = body_presence(x0["skel"]) * eps_scalar["skel"]
    return Threat(x0, active, eps, eps_scalar)


def uniform_start(threat: Threat, key: str, streams: RandomStreams) -> torch.Tensor:
    """A uniform point of the ε-ball (intersected with [0, 1])."""
    x0 = threat.x0[key]
    noise = streams.rand(x0.shape[1:], dtype=x0.dtype).to(x0.device).mul_(2).sub_(1)
    return (x0 + noise * threat.eps[key]).clamp_(0.0, 1.0)


def gradients(model, threat: Threat, adv: dict[str, torch.Tensor], labels: torch.Tensor, loss_fn,
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Logits, per-example loss and the gradient of the summed loss w.r.t. each active
    modality (None where the model ignores it). Summing keeps per-example gradients
    independent of the batch."""
    leaves = {k: adv[k].detach().requires_grad_(True) for k in threat.active}
    with torch.enable_grad():
        logits = model(*threat.inputs(leaves)).logits
        loss = loss_fn(logits, labels)
        if not loss.requires_grad:  # the model ignores every attacked modality
            return logits.detach(), loss.detach(), {k: None for k in threat.active}
        grads = torch.autograd.grad(loss.sum(), [leaves[k] for k in threat.active], allow_unused=True)
    return logits.detach(), loss.detach(), dict(zip(threat.active, grads))


class Tracker:
    """Keeps, per clip of the batch, the first misclassified iterate and which one it was,
    and which clips are still being attacked (``alive``: indices into the full batch)."""

    def __init__(self, threat: Threat, labels: torch.Tensor):
        batch = labels.shape[0]
        device = labels.device
        self.out = {k: threat.x0[k].clone() for k in threat.active}
        self.broken = torch.zeros(batch, dtype=torch.bool, device=device)
        self.iterate = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.alive = torch.arange(batch, device=device)

    def record(self, hit: torch.Tensor, adv: dict[str, torch.Tensor], iterate: int) -> torch.Tensor:
        """Mark the alive clips flagged by ``hit`` as broken at ``iterate`` with point
        ``adv``; returns the mask of alive clips to keep attacking."""
        if hit.any():
            rows = self.alive[hit]
            for k in self.out:
                self.out[k][rows] = adv[k][hit]
            self.broken[rows] = True
            self.iterate[rows] = iterate
        keep = ~hit
        self.alive = self.alive[keep]
        return keep

    def finish(self, adv: dict[str, torch.Tensor]) -> None:
        """The survivors' final points."""
        for k in self.out:
            self.out[k][self.alive] = adv[k]
