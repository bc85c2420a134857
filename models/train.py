"""Training objectives and the training loop (with per-epoch checkpoints and resume).

Objectives, per mini-batch (x_R, x_s, y):

* ``none``  — clean cross-entropy: CE(f(x_R, x_s), y).
* ``at-r`` / ``at-s`` / ``at-rs`` — Madry adversarial training (eq. 5): CE(f(x'), y) where x'
  is the multimodal PGD point of the inner maximisation (eq. 6/7) with only RGB, only
  skeleton, or both perturbed.
* ``amr`` — eq. 12: L = CE(ŷ, y) + λ·L_AMR, ŷ = f(x_R, x_s) on natural inputs and
  L_AMR = CE(y', y) + (1/S)·Σ_i CE(y*_i, y) on the adversarial inputs (eq. 11), y*_i the
  auxiliary prediction of AMR i. With S = 0 the auxiliary term is absent.
* ``amr-frozen`` — the same objective and heads with every AMR's W fixed at its initial
  value (0.5): the ablation that tells the reweighting's share of AMR's gain from the loss's.
* ``minsim`` / ``minsim-exfmem`` — Tian & Xu's constraint on clean inputs: multimodal
  dispersion and unimodal compactness, CE(f(x_R, x_s), y) + β·mean_b cos(P_R f_R, P_s f_s)
  + γ·(compactness_R + compactness_s)/2 (``models.baselines``).

The AMR weights θ get no weight decay unless ``TrainConfig.amr_weight_decay`` (decay pulls
θ to 0, i.e. W = σ(θ) to 0.5); identity-parametrised weights are projected onto [0, 1]
after every step.
* ``exfmem`` — clean cross-entropy; ``exfmem`` and ``minsim-exfmem`` then fill the model's
  ExFMem memory banks with training features after the last epoch (``build_memory_banks``).

The inner maximisation runs with the model in eval mode (see ``models.attacks``).

With torch.distributed initialised, every rank runs ``train`` with the same arguments and the
ranks train one model with DistributedDataParallel: see ``models.distributed`` for how the
batches, attack seeds, BatchNorm, metrics and checkpoints are shared out.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from .attacks import attack
from .checkpoint import replace_dir, resolve_device, save_checkpoint, state_tensors, write_json
from .baselines import MINSIM_SEED, minsim_compactness, minsim_similarity
from .config import AMR_DEFENCES, EXFMEM_DEFENCES, MINSIM_DEFENCES, ModelConfig, TrainConfig, resolve_model_config
from .distributed import RankBatches, Ranks, check_global_batch, check_sync_batchnorm
from .fusion import build_model

LAST_DIR = "last"
MODEL_DIR = "model"


class TrainingCancelled(Exception):
    """``should_stop()`` asked the loop to stop; the last epoch checkpoint is kept."""


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: every later step would be wasted (and the weights are
    NaN). The last epoch checkpoint, from before it happened, is kept."""


def objective(model, train_cfg: TrainConfig, rgb, skel, labels, attack_seed: int):
    """Loss of one mini-batch under ``train_cfg.defence``; returns (loss, logits used for
    the training accuracy)."""
    adv_rgb, adv_skel = adversarial_inputs(model, train_cfg, rgb, skel, labels, attack_seed)
    return training_loss(model, train_cfg, rgb, skel, labels, adv_rgb, adv_skel)


def adversarial_inputs(model, train_cfg: TrainConfig, rgb, skel, labels, attack_seed: int,
                       shard: tuple[int, int] | None = None):
    """The inner maximisation's ``(adv_rgb, adv_skel)``, or ``(None, None)`` for a defence that
    trains on clean inputs. ``shard``: this batch's rows of the global batch (data parallel)."""
    mode = train_cfg.attack_mode
    if mode is None or train_cfg.defence in MINSIM_DEFENCES:
        return None, None
    return attack(model, rgb, skel, labels, train_cfg.attack.with_mode(mode), seed=attack_seed, shard=shard)


def training_loss(model, train_cfg: TrainConfig, rgb, skel, labels, adv_rgb=None, adv_skel=None):
    """The loss of ``objective`` given the adversarial inputs (None for clean defences)."""
    if train_cfg.defence in MINSIM_DEFENCES:
        f_rgb, f_skel, _ = model.forward_features(rgb, skel)
        logits = model.classify(f_rgb, f_skel)
        similarity = minsim_similarity(f_rgb, f_skel, train_cfg.minsim_dim)
        loss = F.cross_entropy(logits, labels) + train_cfg.minsim_beta * similarity
        if train_cfg.minsim_gamma:
            compact = (minsim_compactness(f_rgb, labels, train_cfg.minsim_dim, MINSIM_SEED)
                       + minsim_compactness(f_skel, labels, train_cfg.minsim_dim, MINSIM_SEED + 1)) / 2
            loss = loss + train_cfg.minsim_gamma * compact
        return loss, logits
    if adv_rgb is None:
        out = model(rgb, skel)
        return F.cross_entropy(out.logits, labels), out.logits
    if train_cfg.defence not in AMR_DEFENCES:
        out = model(adv_rgb, adv_skel)
        return F.cross_entropy(out.logits, labels), out.logits
    natural = model(rgb, skel)
    adversarial = model(adv_rgb, adv_skel)
    loss_amr = F.cross_entropy(adversarial.logits, labels)
    if adversarial.aux:
        loss_amr = loss_amr + sum(F.cross_entropy(a, labels) for a in adversarial.aux) / len(adversarial.aux)
    return F.cross_entropy(natural.logits, labels) + train_cfg.lam * loss_amr, natural.logits


def amr_weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The AMR weights θ (``w_rgb``, ``w_skel`` of every AMR), not their auxiliary heads."""
    return [p for amr in getattr(model, "amrs", []) for p in (amr.w_rgb, amr.w_skel)]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (or Adam) over the trainable parameters. Two groups: everything else with
    ``weight_decay``, and the AMR weights θ without it unless ``amr_weight_decay``, at
    ``amr_lr_scale`` times the learning rate (a group's ``lr_scale``). Under
    ``amr-frozen`` the AMR weights are frozen (``requires_grad`` off) and left out."""
    weights = amr_weight_parameters(model)
    if train_cfg.defence == "amr-frozen":
        for p in weights:
            p.requires_grad_(False)
        weights = []
    skip = {id(p) for p in amr_weight_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in skip and p.requires_grad]}]
    if weights:
        groups.append({"params": weights, "weight_decay": train_cfg.weight_decay if train_cfg.amr_weight_decay else 0.0,
                       "lr": train_cfg.lr * train_cfg.amr_lr_scale, "lr_scale": train_cfg.amr_lr_scale})
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)


def project_amr_weights(model: nn.Module) -> None:
    for amr in getattr(model, "amrs", []):
        amr.project_()


class TrainingStep(nn.Module):
    """``training_loss`` as a module, so that DistributedDataParallel sees one forward per step
    whatever the objective does inside (AMR runs the network twice, MinSim calls
    ``forward_features``). The attack runs before it, on the bare model."""

    def __init__(self, model: nn.Module, train_cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg

    def forward(self, rgb, skel, labels, adv_rgb=None, adv_skel=None):
        return training_loss(self.model, self.train_cfg, rgb, skel, labels, adv_rgb, adv_skel)


@torch.no_grad()
def build_memory_banks(model, dataset, *, seed: int = 0, batch_size: int = 16, device=None) -> int:
    """Fill ``model.exfmem`` with the clean pooled features of up to ``exfmem_size`` training
    clips (a seeded random subset, model in eval mode); returns the number stored."""
    size = model.exfmem.size
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    loader = DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    rgb_feats, skel_feats = [], []
    for rgb, skel, _ in loader:
        f_rgb, f_skel, _ = model.forward_features(rgb.to(device), skel.to(device))
        rgb_feats.append(f_rgb)
        skel_feats.append(f_skel)
    model.exfmem.build(torch.cat(rgb_feats), torch.cat(skel_feats))
    model.train(was_training)
    return int(model.exfmem.count)


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine annealing with T_max = epochs, evaluated at the start of ``epoch`` (0-based)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))


def _save_last(out_dir: Path, model, optimizer, state: dict[str, Any]) -> Path:
    final = out_dir / LAST_DIR
    tmp = out_dir / (LAST_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(state_tensors(model), str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    buffers = {}  # "<param name>::<state key>" → tensor (SGD momentum, Adam moments and step)
    for p, state_of_p in optimizer.state.items():
        for key, value in state_of_p.items():
            if torch.is_tensor(value):
                buffers[f"{names[id(p)]}::{key}"] = value.detach().to("cpu").contiguous().clone()
    save_file(buffers, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "state.json", state)
    replace_dir(tmp, final)
    return final


def _read_last(last: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, weights, optimizer buffers) of a ``last/`` checkpoint, tensors on the CPU."""
    return (json.loads((last / "state.json").read_text()), load_file(str(last / "model.safetensors")),
            load_file(str(last / "optimizer.safetensors")))


def _apply_last(saved, model, optimizer, device) -> dict[str, Any]:
    state, weights, buffers = saved
    model.load_state_dict(weights)
    params = dict(model.named_parameters())
    for full_name, value in buffers.items():
        name, key = full_name.split("::")
        # Adam keeps its step counter on the CPU; everything else lives with the parameter.
        optimizer.state[params[name]][key] = value if key == "step" else value.to(device)
    return state


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, dataset, out_dir: str | Path, *,
          preset: str | None = None,
          progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_checkpoint: Callable[[Path, int], None] | None = None,
          device: str | None = None, resume: bool = True, sync_batchnorm: bool = False,
          num_workers: int = 0) -> dict[str, Any]:
    """Train ``model_cfg`` on ``dataset`` (a ``ClipDataset``) with ``train_cfg``.

    Writes ``out_dir/last/`` after every epoch (weights, momentum buffers, epoch, history)
    and resumes from it when ``resume`` is true; writes the final checkpoint to
    ``out_dir/model/``. ``progress`` gets a dict after every step and every epoch.

    Data parallel (torch.distributed initialised): every rank calls this with the same
    arguments and its own ``device``; ``train_cfg.batch_size`` is the global batch. Only rank 0
    writes checkpoints and calls ``progress``, ``should_stop`` and ``on_checkpoint``.
    ``sync_batchnorm`` (CUDA only) normalises with the statistics of the global batch.
    ``num_workers`` DataLoader processes read (and from a ``jpeg`` cache decode) the clips
    while the model trains; the result does not depend on it (the batches are drawn here,
    and loading draws no random number).
    """
    out_dir = Path(out_dir)
    device = resolve_device(device)
    ranks = Ranks.current(device)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = resolve_model_config(model_cfg, train_cfg)
    if model_cfg.num_classes != len(dataset.class_names):
        raise ValueError(f"num_classes {model_cfg.num_classes} != {len(dataset.class_names)} classes in the dataset")
    check_global_batch(train_cfg.batch_size, len(dataset), ranks.world)
    check_sync_batchnorm(sync_batchnorm and ranks.world > 1, device)

    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(device)
    if sync_batchnorm and ranks.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, train_cfg)
    start_epoch, history = 0, []
    last = out_dir / LAST_DIR
    # Rank 0 reads last/ and hands it to the others: only its machine needs the run directory.
    saved = _read_last(last) if ranks.main and resume and (last / "state.json").is_file() else None
    saved = ranks.broadcast_object(saved)
    if saved is not None:
        state = _apply_last(saved, model, optimizer, device)
        if state.get("model") != model_cfg.to_dict() or state.get("train") != train_cfg.to_dict():
            raise ValueError(f"{last}: the checkpoint to resume was made with another config; "
                             "use a new output directory or resume=False")
        start_epoch, history = state["epoch"], state["history"]
    # One DDP forward per step; the AMR heads get no gradient unless the AMR loss uses them.
    net = ranks.wrap(TrainingStep(model, train_cfg),
                     find_unused_parameters=bool(len(model.amrs)) and train_cfg.defence not in AMR_DEFENCES)

    generator = torch.Generator().manual_seed(train_cfg.seed)
    loader = DataLoader(dataset, batch_sampler=RankBatches(dataset, train_cfg.batch_size, generator, ranks.rank,
                                                           ranks.world), generator=generator, num_workers=num_workers)
    steps = len(loader)
    emit = (progress if ranks.main else None) or (lambda _: None)
    for epoch in range(start_epoch, train_cfg.epochs):
        # Re-seed per epoch (batch order and dropout) so that a resumed run is identical to
        # an uninterrupted one. Dropout draws differ per rank (each holds other clips).
        generator.manual_seed(train_cfg.seed * 100_003 + epoch)
        torch.manual_seed(train_cfg.seed * 7_919 + epoch + ranks.rank * 1_000_003)
        lr = cosine_lr(train_cfg.lr, epoch, train_cfg.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        model.train()
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        for step, (rgb, skel, labels) in enumerate(loader):
            # Rank 0 decides and every rank follows: one rank leaving alone would hang the rest.
            if ranks.from_main(ranks.main and should_stop is not None and should_stop()):
                raise TrainingCancelled(f"stopped during epoch {epoch + 1}")
            rgb, skel, labels = rgb.to(device), skel.to(device), labels.to(device)
            seed = (train_cfg.seed * 1_000_003 + epoch * 10_007 + step) % (2**63)
            adv_rgb, adv_skel = adversarial_inputs(model, train_cfg, rgb, skel, labels, seed,
                                                   shard=ranks.shard(labels.shape[0]))
            loss, logits = net(rgb, skel, labels, adv_rgb, adv_skel)
            # Sums over the global batch, so that every rank sees the same numbers.
            step_loss, step_correct, step_seen = ranks.sum([loss.item() * labels.shape[0],
                                                            (logits.argmax(1) == labels).sum().item(),
                                                            labels.shape[0]])
            value = step_loss / step_seen
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}, batch size "
                    f"{train_cfg.batch_size}); lower the learning rate or raise the batch size")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            project_amr_weights(model)
            if not sync_batchnorm:
                ranks.average_batchnorm_statistics(model)
            total_loss += step_loss
            correct += int(step_correct)
            seen += int(step_seen)
            emit({"phase": "train", "epoch": epoch + 1, "epochs": train_cfg.epochs, "step": step + 1,
                  "steps": steps, "loss": total_loss / seen, "lr": lr})
        record = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1),
                  "train_accuracy": 100.0 * correct / max(seen, 1), "lr": lr,
                  "seconds": ranks.max(time.perf_counter() - t0)}
        history.append(record)
        ranks.check_in_step(model)
        if ranks.main:
            state = {"epoch": epoch + 1, "history": history, "model": model_cfg.to_dict(),
                     "train": train_cfg.to_dict(), "preset": preset}
            saved = _save_last(out_dir, model, optimizer, state)
            if on_checkpoint is not None:
                on_checkpoint(saved, epoch + 1)
        ranks.barrier()
        emit({"phase": "epoch", "epochs": train_cfg.epochs, **record})

    model_dir = out_dir / MODEL_DIR
    summary = {"epochs": train_cfg.epochs, "history": history, "model_dir": str(model_dir)}
    if not ranks.main:
        ranks.barrier()  # rank 0 writes the final checkpoint
        return summary
    extra = {}
    if train_cfg.defence in EXFMEM_DEFENCES:
        extra["exfmem"] = {"bank_size": build_memory_banks(model, dataset, seed=train_cfg.seed,
                                                           batch_size=train_cfg.batch_size, device=device)}
    if ranks.world > 1:
        extra["data_parallel"] = {"world_size": ranks.world, "backend": torch.distributed.get_backend(),
                                  "sync_batchnorm": sync_batchnorm}

    meta = {
        "model": model_cfg.to_dict(),
        "preset": preset,
        "class_names": list(dataset.class_names),
        "normalisation": {"skel_min": [float(v) for v in dataset.skel_min],
                          "skel_max": [float(v) for v in dataset.skel_max],
                          "rgb": "[0,1] input, scaled to [-1,1] inside I3D"},
        "train": train_cfg.to_dict(),
        "history": history,
        "dataset": {"protocol": getattr(dataset, "protocol", None), "split": getattr(dataset, "split", None),
                    "num_samples": len(dataset)},
        **extra,
    }
    save_checkpoint(model_dir, model, meta)
    ranks.barrier()
    return summary
