"""The public Python API (``from robustact import attack, evaluate, load_model``): thin,
documented entry points over ``robustact.models``, with ε and α in 1/255 units as in the
CLI and the REST API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence


def load_model(path: str | Path, device: str | None = None):
    """A trained model from its checkpoint directory (``model.safetensors`` + ``config.json``;
    nothing is unpickled). Returns ``(model, meta)``: the network in eval mode on ``device``
    (default: CUDA when present, else CPU) and the checkpoint's config (class names,
    normalisation constants, training recipe, history)."""
    from robustact.models.checkpoint import load_checkpoint, resolve_device

    return load_checkpoint(path, device=resolve_device(device))


def attack(model, rgb, skel, labels, spec: str = "pgd20", *, mode: str = "RS", eps: float = 8.0,
           alpha: float = 2.0, random_start: bool = True, restarts: int = 1, seed: int = 0,
           clip_ids: Sequence[int] | None = None):
    """Attack one batch. ``rgb`` (B, 3, T, H, W) and ``skel`` (B, C, T, V, M) in [0, 1] as
    the model takes them, ``labels`` (B,); ``spec`` one attack string (fgsm, pgdK, cwK,
    apgd-ce[K], apgd-dlr[K], square[K]); ``mode`` R (RGB only), S (skeleton only) or RS;
    ``eps``/``alpha`` in 1/255 units. Returns an ``AttackResult``: ``rgb``, ``skel`` (the
    adversarial inputs), ``broken`` (which clips some iterate misclassified), ``iterate``
    and ``restart``. ``clip_ids`` name the clips for their random starts (default 0..B-1)."""
    from robustact.models.attacks import run_attack
    from robustact.models.evaluate import build_suite

    suite = build_suite([spec], modes=[mode], eps=[eps], alpha=alpha, random_start=random_start, restarts=restarts)
    if len(suite) != 1:
        raise ValueError(f"{spec!r} is not one attack (use evaluate() for presets such as autoattack)")
    device = next(model.parameters()).device
    ids = list(clip_ids) if clip_ids is not None else list(range(int(labels.shape[0])))
    return run_attack(model, rgb.to(device), skel.to(device), labels.to(device), suite[0], seed=seed, clip_ids=ids)


def evaluate(model, meta: dict[str, Any], data, *, attacks: Sequence[str] = ("fgsm", "pgd20"),
             modes: Sequence[str] = ("R", "S", "RS"), eps: Sequence[float] = (8.0,), alpha: float = 2.0,
             restarts: int = 1, protocol: str = "xsub", split: str = "test", batch_size: int = 16, seed: int = 0,
             strategy: str | None = None, diagnostics: bool = True, device: str | None = None,
             progress: Callable[[dict], None] | None = None):
    """Evaluate ``model`` against attacks × modes × ε on ``data``: a prepared cache
    directory (``robustact data prepare``; ``protocol``/``split`` pick the clips) or any
    dataset of ``(rgb, skel, label)`` (a cache's skeletons are scaled with the checkpoint's
    constants, whatever the cache's own). Returns ``(report, records)``: the
    ``robustact.report/v2`` document (clean, per attack, worst case per clip, diagnostics)
    and the per-clip table it is computed from (``records.save(path)`` writes it)."""
    from robustact.models.evaluate import build_suite, check_suite, default_strategy
    from robustact.models.evaluate import evaluate as run_evaluation

    dataset, info = data, {}
    if isinstance(data, (str, Path)):
        from robustact.models.data.cache import ClipDataset

        dataset = ClipDataset(data, protocol=protocol, split=split, normalisation=meta.get("normalisation"))
        info = {"cache": str(data), "protocol": protocol, "split": split}
    suite = build_suite(list(attacks), modes=list(modes), eps=list(eps), alpha=alpha, restarts=restarts)
    check_suite(suite, len(meta["class_names"]))
    return run_evaluation(model, meta, dataset, suite, batch_size=batch_size, seed=seed,
                          strategy=strategy or default_strategy(list(attacks)), diagnostics=diagnostics,
                          progress=progress, device=device, dataset_info=info)
