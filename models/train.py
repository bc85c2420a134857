"""Training objectives and the training loop (with per-epoch checkpoints and resume).

Objectives, per mini-batch (x_R, x_s, y):

* ``none``  — clean cross-entropy: CE(f(x_R, x_s), y).
* ``at-r`` / ``at-s`` / ``at-rs`` — Madry adversarial training (eq. 5): CE(f(x'), y) where x'
  is the multimodal PGD point of the inner maximisation (eq. 6/7) with only RGB, only
  skeleton, or both perturbed.
* ``amr`` — eq. 12: L = CE(ŷ, y) + λ·L_AMR, ŷ = f(x_R, x_s) on natural inputs and
  L_AMR = CE(y', y) + (1/S)·Σ_i CE(y*_i, y) on the adversarial inputs (eq. 11), y*_i the
  auxiliary prediction of AMR i. With S = 0 the auxiliary term is absent.
* ``minsim`` / ``minsim-exfmem`` — Tian & Xu's dissimilarity constraint on clean inputs:
  CE(f(x_R, x_s), y) + β·mean_b cos(P_R f_R, P_s f_s) (``models.baselines``).
* ``exfmem`` — clean cross-entropy; ``exfmem`` and ``minsim-exfmem`` then fill the model's
  ExFMem memory banks with training features after the last epoch (``build_memory_banks``).

The inner maximisation runs with the model in eval mode (see ``models.attacks``).
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
from torch.utils.data import DataLoader

from .attacks import attack
from .checkpoint import replace_dir, resolve_device, save_checkpoint, state_tensors, write_json
from .baselines import minsim_similarity
from .config import EXFMEM_DEFENCES, MINSIM_DEFENCES, ModelConfig, TrainConfig, resolve_model_config
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
    mode = train_cfg.attack_mode
    if train_cfg.defence in MINSIM_DEFENCES:
        f_rgb, f_skel, _ = model.forward_features(rgb, skel)
        logits = model.classify(f_rgb, f_skel)
        similarity = minsim_similarity(f_rgb, f_skel, train_cfg.minsim_dim)
        return F.cross_entropy(logits, labels) + train_cfg.minsim_beta * similarity, logits
    if mode is None:
        out = model(rgb, skel)
        return F.cross_entropy(out.logits, labels), out.logits
    adv_rgb, adv_skel = attack(model, rgb, skel, labels, train_cfg.attack.with_mode(mode), seed=attack_seed)
    if train_cfg.defence != "amr":
        out = model(adv_rgb, adv_skel)
        return F.cross_entropy(out.logits, labels), out.logits
    natural = model(rgb, skel)
    adversarial = model(adv_rgb, adv_skel)
    loss_amr = F.cross_entropy(adversarial.logits, labels)
    if adversarial.aux:
        loss_amr = loss_amr + sum(F.cross_entropy(a, labels) for a in adversarial.aux) / len(adversarial.aux)
    return F.cross_entropy(natural.logits, labels) + train_cfg.lam * loss_amr, natural.logits


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


def _load_last(last: Path, model, optimizer, device) -> dict[str, Any]:
    state = json.loads((last / "state.json").read_text())
    model.load_state_dict(load_file(str(last / "model.safetensors"), device=str(device)))
    buffers = load_file(str(last / "optimizer.safetensors"))
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
          device: str | None = None, resume: bool = True) -> dict[str, Any]:
    """Train ``model_cfg`` on ``dataset`` (a ``ClipDataset``) with ``train_cfg``.

    Writes ``out_dir/last/`` after every epoch (weights, momentum buffers, epoch, history)
    and resumes from it when ``resume`` is true; writes the final checkpoint to
    ``out_dir/model/``. ``progress`` gets a dict after every step and every epoch.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    model_cfg = resolve_model_config(model_cfg, train_cfg)
    if model_cfg.num_classes != len(dataset.class_names):
        raise ValueError(f"num_classes {model_cfg.num_classes} != {len(dataset.class_names)} classes in the dataset")

    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(device)
    if train_cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum,
                                    weight_decay=train_cfg.weight_decay)
    start_epoch, history = 0, []
    last = out_dir / LAST_DIR
    if resume and (last / "state.json").is_file():
        state = _load_last(last, model, optimizer, device)
        if state.get("model") != model_cfg.to_dict() or state.get("train") != train_cfg.to_dict():
            raise ValueError(f"{last}: the checkpoint to resume was made with another config; "
                             "use a new output directory or resume=False")
        start_epoch, history = state["epoch"], state["history"]

    generator = torch.Generator().manual_seed(train_cfg.seed)
    loader = DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True, generator=generator,
                        drop_last=len(dataset) > train_cfg.batch_size)
    steps = len(loader)
    emit = progress or (lambda _: None)
    for epoch in range(start_epoch, train_cfg.epochs):
        # Re-seed per epoch (batch order and dropout) so that a resumed run is identical to
        # an uninterrupted one.
        generator.manual_seed(train_cfg.seed * 100_003 + epoch)
        torch.manual_seed(train_cfg.seed * 7_919 + epoch)
        lr = cosine_lr(train_cfg.lr, epoch, train_cfg.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        for step, (rgb, skel, labels) in enumerate(loader):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"stopped during epoch {epoch + 1}")
            rgb, skel, labels = rgb.to(device), skel.to(device), labels.to(device)
            seed = (train_cfg.seed * 1_000_003 + epoch * 10_007 + step) % (2**63)
            loss, logits = objective(model, train_cfg, rgb, skel, labels, seed)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}, batch size "
                    f"{train_cfg.batch_size}); lower the learning rate or raise the batch size")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += value * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.shape[0]
            emit({"phase": "train", "epoch": epoch + 1, "epochs": train_cfg.epochs, "step": step + 1,
                  "steps": steps, "loss": total_loss / seen, "lr": lr})
        record = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1),
                  "train_accuracy": 100.0 * correct / max(seen, 1), "lr": lr,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        state = {"epoch": epoch + 1, "history": history, "model": model_cfg.to_dict(),
                 "train": train_cfg.to_dict(), "preset": preset}
        saved = _save_last(out_dir, model, optimizer, state)
        if on_checkpoint is not None:
            on_checkpoint(saved, epoch + 1)
        emit({"phase": "epoch", "epochs": train_cfg.epochs, **record})

    extra = {}
    if train_cfg.defence in EXFMEM_DEFENCES:
        extra["exfmem"] = {"bank_size": build_memory_banks(model, dataset, seed=train_cfg.seed,
                                                           batch_size=train_cfg.batch_size, device=device)}

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
    model_dir = out_dir / MODEL_DIR
    save_checkpoint(model_dir, model, meta)
    return {"epochs": train_cfg.epochs, "history": history, "model_dir": str(model_dir)}
