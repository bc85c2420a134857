"""Evaluation of an attack suite on a dataset split → a ``robustact.report/v1`` document."""

from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from .attacks import attack
from .checkpoint import resolve_device
from .config import MODES, AttackConfig, ConfigError
from .report import REPORT_SCHEMA, average


class EvaluationCancelled(Exception):
    """``should_stop()`` asked the evaluation to stop."""


_ATTACK_SPEC = re.compile(r"^(fgsm|pgd|cw)(\d*)$")


def parse_attack_spec(spec: str) -> tuple[str, int]:
    """"fgsm" → ("fgsm", 1); "pgd20" → ("pgd", 20); "cw30" → ("cw", 30); "pgd" → 20, "cw" → 30."""
    m = _ATTACK_SPEC.match(spec.strip().lower())
    if not m:
        raise ConfigError("attacks", f"unknown attack {spec!r} (use fgsm, pgdK or cwK, e.g. pgd20)")
    name, steps = m.group(1), m.group(2)
    if name == "fgsm":
        if steps:
            raise ConfigError("attacks", f"FGSM takes no step count ({spec!r})")
        return name, 1
    return name, int(steps) if steps else {"pgd": 20, "cw": 30}[name]


def build_suite(attacks: list[str], modes: list[str] = list(MODES), eps: list[float] = (8.0,),
                alpha: float = 2.0, random_start: bool = True) -> list[AttackConfig]:
    """Attack configs for every attack × ε × mode. ε and α are given in 1/255 units."""
    suite = []
    for spec in attacks:
        name, steps = parse_attack_spec(spec)
        for e in eps:
            for mode in modes:
                suite.append(AttackConfig(name=name, mode=mode, steps=steps, eps_rgb=e / 255, eps_skel=e / 255,
                                          alpha_rgb=alpha / 255, alpha_skel=alpha / 255, random_start=random_start))
    return suite


def _group_key(cfg: AttackConfig) -> tuple:
    d = cfg.to_dict()
    d.pop("mode")
    return tuple(sorted(d.items()))


def evaluate(model, meta: dict[str, Any], dataset, suite: list[AttackConfig], *, batch_size: int = 16,
             seed: int = 0, progress: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None, device: str | None = None,
             dataset_info: dict[str, Any] | None = None, model_info: dict[str, Any] | None = None) -> dict:
    """Clean accuracy and accuracy under each attack of ``suite``, overall and per class."""
    device = resolve_device(device)
    model = model.to(device).eval()
    num_classes = len(meta["class_names"])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    per_class_total = torch.zeros(num_classes, dtype=torch.long)
    clean_correct = torch.zeros(num_classes, dtype=torch.long)
    adv_correct = [torch.zeros(num_classes, dtype=torch.long) for _ in suite]
    emit = progress or (lambda _: None)
    t0 = time.perf_counter()
    steps = len(loader)
    for step, (rgb, skel, labels) in enumerate(loader):
        if should_stop is not None and should_stop():
            raise EvaluationCancelled(f"stopped at batch {step + 1} of {steps}")
        rgb, skel, labels = rgb.to(device), skel.to(device), labels.to(device)
        per_class_total += torch.bincount(labels.cpu(), minlength=num_classes)
        with torch.no_grad():
            pred = model(rgb, skel).logits.argmax(1)
        clean_correct += torch.bincount(labels[pred == labels].cpu(), minlength=num_classes)
        for i, cfg in enumerate(suite):
            adv_rgb, adv_skel = attack(model, rgb, skel, labels, cfg, seed=seed * 1_000_003 + step * 101 + i)
            with torch.no_grad():
                pred = model(adv_rgb, adv_skel).logits.argmax(1)
            adv_correct[i] += torch.bincount(labels[pred == labels].cpu(), minlength=num_classes)
        emit({"phase": "evaluate", "step": step + 1, "steps": steps,
              "clean_accuracy": 100.0 * clean_correct.sum().item() / max(per_class_total.sum().item(), 1)})

    n = int(per_class_total.sum())

    def accuracy(correct: torch.Tensor) -> dict[str, Any]:
        per_class = [100.0 * c / t if t else None for c, t in zip(correct.tolist(), per_class_total.tolist())]
        return {"accuracy": 100.0 * correct.sum().item() / max(n, 1), "per_class": per_class}

    groups: dict[tuple, dict[str, Any]] = {}
    for cfg, correct in zip(suite, adv_correct):
        key = _group_key(cfg)
        if key not in groups:
            entry = {"label": cfg.label, **{k: v for k, v in cfg.to_dict().items() if k != "mode"}, "modes": {}}
            groups[key] = entry
        groups[key]["modes"][cfg.mode] = accuracy(correct)
    attacks = list(groups.values())
    for entry in attacks:
        if all(m in entry["modes"] for m in MODES):
            entry["avg"] = average(*(entry["modes"][m]["accuracy"] for m in MODES))

    amr = model.amr_weights() if hasattr(model, "amr_weights") else []
    return {
        "schema": REPORT_SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": (model_info or {}).get("name") or meta.get("name") or meta["train"].get("defence", "model"),
            "arch": meta["model"]["arch"], "preset": meta.get("preset"),
            "defence": meta.get("train", {}).get("defence"), "num_amr": meta["model"].get("num_amr", 0),
            "lam": meta.get("train", {}).get("lam"), "weights_sha256": meta.get("weights_sha256"),
            "config": meta["model"], "train": meta.get("train"),
            **{k: v for k, v in (model_info or {}).items() if k != "name"},
        },
        "dataset": {"num_samples": n, "class_names": list(meta["class_names"]), **(dataset_info or {})},
        "config": {"batch_size": batch_size, "seed": seed, "device": str(device),
                   "suite": [c.to_dict() for c in suite]},
        "clean": accuracy(clean_correct),
        "attacks": attacks,
        "amr_weights": amr,
        "timing": {"seconds": time.perf_counter() - t0},
    }
