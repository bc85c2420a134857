"""The ``robustact`` command line: data synth/prepare, train, evaluate, compare, serve, worker.

Heavy imports happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, attack and compare RGB + skeleton action-recognition models (AMR and baselines).")
data_app = typer.Typer(no_args_is_help=True, help="Write a synthetic NTU-format dataset, or decode a dataset into a training cache.")
app.add_typer(data_app, name="data")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service: create, list, revoke (works on the "
                                                  "service's database directly; ROBUSTACT_* settings apply).")
app.add_typer(keys_app, name="keys")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@contextmanager
def _user_errors():
    """Turn the engine's input errors into a one-line CLI error (no traceback)."""
    from robustact.models.checkpoint import CheckpointError
    from robustact.models.config import ConfigError
    from robustact.models.data.ntu import SkeletonFormatError, VideoDecodeError
    from robustact.models.report import ReportError

    try:
        yield
    except (ConfigError, CheckpointError, ReportError, SkeletonFormatError, VideoDecodeError,
            FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))


@contextmanager
def _progress_bar(description: str):
    """A rich progress bar driven by ``update(done, total, **fields)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  transient=False, disable=not sys.stderr.isatty() and not _force_progress()) as bar:
        task = bar.add_task(description, total=None, info="")

        def update(done: int, total: int | None, info: str = "", description: str | None = None):
            kwargs = {"completed": done, "total": total, "info": info}
            if description:
                kwargs["description"] = description
            bar.update(task, **kwargs)

        yield update


def _force_progress() -> bool:
    import os

    return os.environ.get("ROBUSTACT_PROGRESS") == "1"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        _fail(f"{option}: expected comma-separated integers, got {value!r}")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Dataset root to write (NTU layout: nturgb+d_skeletons/, nturgb+d_rgb/, classes.txt; "
                                           "iMiGUE layout: classes.txt, labels.csv, split.json, videos/, skeleton/).")],
    layout: Annotated[str, typer.Option(help="ntu (3-D Kinect skeletons, 25 joints, .avi per clip) or imigue (2-D OpenPose JSON per "
                                             "frame, 22 upper-body joints, labelled clips of one .mp4 per session).")] = "ntu",
    classes: Annotated[int, typer.Option(help="Number of action classes (distinct parametric motions × held objects).")] = 6,
    objects: Annotated[int, typer.Option(help="Held objects per motion (1-3): with 2, each motion is two classes told apart only "
                                              "in the video (empty hand, long stick), so neither modality alone suffices.")] = 1,
    subjects: Annotated[str, typer.Option(help="Performer ids, comma-separated. X-Sub trains on 1,2,4,5,8,9,13,…; others are test.")] = "1,2,3,4,5,6,7,8",
    cameras: Annotated[str, typer.Option(help="Camera ids (views), comma-separated. X-View trains on 2,3. NTU layout only.")] = "1,2,3",
    replications: Annotated[str, typer.Option(help="Replication ids, comma-separated. NTU layout only.")] = "1,2",
    sessions: Annotated[int, typer.Option(help="Recording sessions (videos) per subject, each with one clip of every class. iMiGUE layout only.")] = 6,
    frames: Annotated[int, typer.Option(help="Frames per clip.")] = 48,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same dataset.")] = 0,
):
    """Write a synthetic dataset in the NTU RGB+D 60 on-disk layout (skeleton text files and .avi videos) or the
    iMiGUE-style one (OpenPose JSON per frame, labelled clips of longer videos)."""
    with _user_errors():
        from robustact.models.data.synth import synthesize
        from robustact.models.data.synth_imigue import synthesize_imigue

        if layout not in ("ntu", "imigue"):
            raise ValueError(f"--layout must be ntu or imigue, got {layout!r}")
        with _progress_bar("synthesising") as update:
            if layout == "imigue":
                summary = synthesize_imigue(out, num_classes=classes, subjects=_ints(subjects, "--subjects"),
                                            sessions=sessions, frames=frames, seed=seed, objects=objects,
                                            progress=lambda d, t: update(d, t))
            else:
                summary = synthesize(out, num_classes=classes, subjects=_ints(subjects, "--subjects"),
                                     cameras=_ints(cameras, "--cameras"), replications=_ints(replications, "--replications"),
                                     frames=frames, seed=seed, objects=objects, progress=lambda d, t: update(d, t))
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("prepare")
def data_prepare(
    root: Annotated[Path, typer.Argument(help="Dataset root, real or synthetic: NTU RGB+D 60 (nturgb+d_skeletons/, nturgb+d_rgb/) or "
                                              "iMiGUE-style (labels.csv, split.json, videos/, skeleton/).")],
    out: Annotated[Path, typer.Option(help="Cache directory to write (meta.json, skel.npy, labels.npy, clips/).")],
    preset: Annotated[str, typer.Option(help="Model preset whose input sizes the cache is decoded to: tiny or paper.")] = "tiny",
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding processes (default: one per core).")] = None,
    cache_format: Annotated[str, typer.Option(help="How RGB frames are stored: raw (exact) or jpeg (several times smaller "
                                                   "on real video, lossy; train and evaluate on the same format).")] = "raw",
):
    """Decode every sample once (PyAV video, skeleton text) into a compact cache that training reads.

    Clips are decoded by a pool of processes and written one file each: an interrupted run resumes where it stopped
    when run again with the same settings. The cache becomes readable only once complete."""
    with _user_errors():
        from robustact.models.config import PRESETS, ConfigError
        from robustact.models.data.cache import prepare

        if preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {tuple(PRESETS)}")
        p = PRESETS[preset]
        with _progress_bar("decoding") as update:
            summary = prepare(root, out, rgb_frames=p["rgb_frames"], rgb_size=p["rgb_size"],
                              skel_frames=p["skel_frames"], progress=lambda d, t: update(d, t),
                              workers=workers, cache_format=cache_format)
    typer.echo(json.dumps(summary, indent=2, default=str))


def _open_dataset(cache: Path, protocol: str, split: str, normalisation: dict | None = None):
    """A split of a prepared cache; ``normalisation`` (a checkpoint's) scales its skeletons
    as the model's training cache did."""
    from robustact.models.data.cache import ClipDataset

    if not (cache / "meta.json").is_file():
        raise FileNotFoundError(f"{cache}: not a prepared cache (run `robustact data prepare` first)")
    return ClipDataset(cache, protocol=protocol, split=split, normalisation=normalisation)


def _check_sizes(meta: dict, model_cfg) -> None:
    """Refuse a cache whose clips are not the model's input (frames, size, skeleton geometry)."""
    from robustact.models.data.layouts import cache_geometry

    want = (model_cfg.rgb_frames, model_cfg.rgb_size, model_cfg.skel_frames)
    have = (meta["rgb_frames"], meta["rgb_size"], meta["skel_frames"])
    if want != have:
        raise ValueError(f"the cache was prepared for rgb_frames/rgb_size/skel_frames={have} but the model "
                         f"expects {want}; run `robustact data prepare --preset …` for this preset")
    geometry = cache_geometry(meta)
    model = {k: getattr(model_cfg, k) for k in geometry}
    if model != geometry:
        raise ValueError(f"the cache holds skeletons of {geometry['joints']} joints × {geometry['skel_channels']} "
                         f"coordinates × {geometry['persons']} bodies but the model takes {model['joints']} × "
                         f"{model['skel_channels']} × {model['persons']}: it was trained on another layout")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Prepared cache directory (from `robustact data prepare`).")],
    out: Annotated[Path, typer.Option(help="Run directory: last/ (per-epoch checkpoint for resume) and model/ (final checkpoint).")],
    preset: Annotated[str, typer.Option(help="Network size and input geometry: tiny (CPU-sized) or paper (full I3D, 64×224×224).")] = "tiny",
    arch: Annotated[str, typer.Option(help="fusion (RGB + skeleton), rgb (unimodal I3D) or skeleton (unimodal HCN).")] = "fusion",
    defence: Annotated[str, typer.Option(help="none, at-r, at-s, at-rs (Madry AT on ✗R/✗S/✗RS), amr (eq. 12), amr-frozen (eq. 12 with W fixed at 0.5: the ablation), or the "
                                              "Tian & Xu baselines minsim, exfmem, minsim-exfmem (clean training; fusion only).")] = "amr",
    num_amr: Annotated[int, typer.Option(help="Number of AMRs, 0-3, counted back from the classifier (only with defence amr).")] = 3,
    lam: Annotated[float, typer.Option(help="λ of eq. 12 (weight of the AMR loss).")] = 1.0,
    epochs: Annotated[int, typer.Option(help="Epochs (cosine annealing over this many; the paper uses 80 on NTU).")] = 80,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 16,
    lr: Annotated[float, typer.Option(help="Initial SGD learning rate.")] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's recipe) or adam (HCN's original; use --lr 0.001). See README.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay.")] = 5e-4,
    attack_steps: Annotated[int, typer.Option(help="PGD steps of the inner maximisation.")] = 10,
    eps: Annotated[float, typer.Option(help="Training budget ε for both modalities, in 1/255 units.")] = 8.0,
    alpha: Annotated[float, typer.Option(help="PGD step size α, in 1/255 units.")] = 2.0,
    amr_activation: Annotated[str, typer.Option(help="AMR weight parametrisation: sigmoid (W = σ(θ)) or identity (W = θ).")] = "sigmoid",
    amr_init: Annotated[Optional[float], typer.Option(help="Initial θ of the AMR weights (default 0 for sigmoid, 0.5 for identity: W = 0.5 either way).")] = None,
    amr_weight_decay: Annotated[bool, typer.Option(help="Apply --weight-decay to the AMR weights θ too (off: decay pulls σ(θ) to 0.5 and the weights barely move).")] = False,
    amr_lr_scale: Annotated[float, typer.Option(min=0.001, help="Learning rate of the AMR weights θ as a multiple of --lr (see docs/REPRODUCTION.md on whether the weights move).")] = 1.0,
    minsim_beta: Annotated[float, typer.Option(help="MinSim: weight β of the batch-mean cross-modal cosine similarity.")] = 1.0,
    minsim_dim: Annotated[int, typer.Option(help="MinSim: common dimension of the fixed random projections of both features.")] = 128,
    minsim_gamma: Annotated[float, typer.Option(help="MinSim: weight γ of the unimodal compactness term (each modality's features pulled to their class centroid).")] = 1.0,
    exfmem_size: Annotated[int, typer.Option(help="ExFMem: training features kept per modality (memory bank size).")] = 512,
    exfmem_lambda: Annotated[float, typer.Option(help="ExFMem: L1 weight λ of the ISTA sparse coding (unit-norm features).")] = 0.05,
    exfmem_mix: Annotated[float, typer.Option(help="ExFMem: mix a of a·Dh + (1−a)·f.")] = 0.5,
    exfmem_steps: Annotated[int, typer.Option(help="ExFMem: ISTA iterations K.")] = 20,
    protocol: Annotated[str, typer.Option(help="Split protocol: xsub or xview.")] = "xsub",
    seed: Annotated[int, typer.Option(help="Seed for initialisation, shuffling and attack starts.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N].")] = "auto",
    resume: Annotated[bool, typer.Option(help="Resume from OUT/last/ when it exists.")] = True,
    nproc: Annotated[int, typer.Option(min=1, help="Data-parallel processes on this machine (DistributedDataParallel: gloo "
                                                   "on CPU, NCCL on CUDA with one GPU each); --batch-size is the global batch, "
                                                   "split evenly. Under torchrun leave it at 1 (see docs/SERVICE.md).")] = 1,
    sync_batchnorm: Annotated[bool, typer.Option(help="Data parallel on CUDA: BatchNorm statistics over the global batch "
                                                     "(SyncBatchNorm) instead of each process's share.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads per process with --nproc (default: cores / nproc).")] = None,
    loader_workers: Annotated[int, typer.Option(min=0, help="DataLoader processes reading (and from a jpeg cache decoding) clips while the model trains (0: in this process; single-process training only). Does not change the result.")] = 0,
):
    """Train a model with a defence (SGD, cosine annealing); checkpoints every epoch and resumes from the last one.

    With --nproc N (or when started by torchrun) the processes train one model with DistributedDataParallel."""
    with _user_errors():
        from contextlib import nullcontext
        from functools import partial

        from robustact.models.config import (AMR_DEFENCES, EXFMEM_DEFENCES, AttackConfig, ConfigError, TrainConfig,
                                             preset_config, resolve_model_config)
        from robustact.models.data.cache import ClipDataset
        from robustact.models.data.layouts import cache_geometry
        from robustact.models.distributed import DistributedError, torchrun_rank, train_data_parallel
        from robustact.models.train import train as run_training

        if defence not in AMR_DEFENCES and num_amr:
            num_amr = 0  # AMR modules only exist with the AMR objective
        if amr_init is None:
            amr_init = 0.0 if amr_activation == "sigmoid" else 0.5  # W = 0.5 either way
        dataset = _open_dataset(data, protocol, "train")
        model_cfg = preset_config(preset, arch=arch, num_classes=len(dataset.class_names), num_amr=num_amr,
                                  **cache_geometry(dataset.meta),
                                  amr_activation=amr_activation, amr_init=amr_init,
                                  exfmem_size=exfmem_size if defence in EXFMEM_DEFENCES else 0,
                                  exfmem_lambda=exfmem_lambda, exfmem_mix=exfmem_mix, exfmem_steps=exfmem_steps)
        _check_sizes(dataset.meta, model_cfg)
        train_cfg = TrainConfig(defence=defence, lam=lam, epochs=epochs, batch_size=batch_size, lr=lr,
                                momentum=momentum, weight_decay=weight_decay, optimizer=optimizer, seed=seed,
                                attack=AttackConfig(name="pgd", mode="RS", steps=attack_steps, eps_rgb=eps / 255,
                                                    eps_skel=eps / 255, alpha_rgb=alpha / 255, alpha_skel=alpha / 255),
                                minsim_beta=minsim_beta, minsim_dim=minsim_dim, minsim_gamma=minsim_gamma,
                                amr_weight_decay=amr_weight_decay, amr_lr_scale=amr_lr_scale)
        model_cfg = resolve_model_config(model_cfg, train_cfg)
        if protocol not in ("xsub", "xview"):
            raise ConfigError("protocol", "must be xsub or xview")
        launched = torchrun_rank()
        if launched is not None and nproc > 1:
            raise ConfigError("nproc", "torchrun starts the processes (--nproc-per-node): leave --nproc at 1")
        main = launched is None or launched[0] == 0  # only rank 0 talks
        if main:
            typer.echo(f"training {arch} ({preset}) with defence={defence} num_amr={num_amr} on {len(dataset)} clips"
                       + (f", {nproc} processes" if nproc > 1 else f", rank 0 of {launched[1]}" if launched else ""))
        with _progress_bar("epoch") if main else nullcontext() as update:
            def on_progress(p):
                if p["phase"] == "train":
                    update(p["step"], p["steps"], info=f"loss {p['loss']:.3f}", description=f"epoch {p['epoch']}/{p['epochs']}")
                else:
                    typer.echo(f"epoch {p['epoch']}/{p['epochs']}: loss {p['loss']:.4f} "
                               f"train acc {p['train_accuracy']:.2f}% ({p['seconds']:.1f}s)")
            try:
                if launched is not None:
                    summary = _train_in_torchrun_group(model_cfg, train_cfg, dataset, out, preset=preset,
                                                       progress=on_progress if main else None, device=device,
                                                       resume=resume, sync_batchnorm=sync_batchnorm)
                elif nproc > 1:
                    summary = train_data_parallel(model_cfg, train_cfg, partial(ClipDataset, data, protocol=protocol,
                                                                                split="train"),
                                                  out, nproc=nproc, device=device, preset=preset, progress=on_progress,
                                                  resume=resume, sync_batchnorm=sync_batchnorm, threads=threads)
                else:
                    summary = run_training(model_cfg, train_cfg, dataset, out, preset=preset, progress=on_progress,
                                           device=device, resume=resume, num_workers=loader_workers)
            except DistributedError as e:
                _fail(str(e))
    if main:
        typer.echo(f"model written to {summary['model_dir']}")


def _train_in_torchrun_group(model_cfg, train_cfg, dataset, out: Path, *, device: str, **kwargs):
    """One rank of a run started by torchrun: join its process group, train, leave."""
    import torch.distributed as dist

    from robustact.models.distributed import join_process_group
    from robustact.models.train import train as run_training

    rank_device = join_process_group(device)
    summary = run_training(model_cfg, train_cfg, dataset, out, device=str(rank_device), **kwargs)
    dist.destroy_process_group()  # not on failure: a peer may be gone, and the process exits anyway
    return summary


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint directory (RUN/model) with model.safetensors and config.json.")],
    data: Annotated[Path, typer.Option(help="Prepared cache directory.")],
    out: Annotated[Path, typer.Option(help="Report JSON to write (schema robustact.report/v2); the per-clip records go beside it as <name>.clips.npz.")],
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks: fgsm, pgdK, cwK, apgd-ce[K], apgd-dlr[K], square[K] (K = queries), or autoattack (= apgd-ce,apgd-dlr,square, run as a cascade).")] = "fgsm,pgd20,cw30",
    modes: Annotated[str, typer.Option(help="Comma-separated modes: R (RGB only), S (skeleton only), RS (both).")] = "R,S,RS",
    eps: Annotated[str, typer.Option(help="Comma-separated budgets ε in 1/255 units, same for both modalities (e.g. 2,4,6,8).")] = "8",
    alpha: Annotated[float, typer.Option(help="Step size α in 1/255 units (PGD, CW).")] = 2.0,
    split: Annotated[str, typer.Option(help="train or test split of the protocol.")] = "test",
    protocol: Annotated[str, typer.Option(help="xsub or xview.")] = "xsub",
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 16,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate at most this many clips: a class-balanced subset drawn with --seed, the same clips `reproduce` and the API's max_samples take.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Row name in comparisons (default: the run directory's name).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the attacks' random starts.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    restarts: Annotated[int, typer.Option(min=1, max=100, help="Restarts of every randomised attack (PGD/CW with random start, APGD, Square); the worst per clip is kept.")] = 1,
    worst_case_only: Annotated[Optional[bool], typer.Option("--worst-case-only/--full", help="Worst-case cascade (per budget and mode, cheapest attack first, only the clips still standing) instead of every attack on every clip. Default: cascade for autoattack, full otherwise.")] = None,
    diagnostics: Annotated[bool, typer.Option(help="Gradient-masking checks (zero gradients, unbounded attack, ...).")] = True,
    loader_workers: Annotated[int, typer.Option(min=0, help="DataLoader processes reading (and from a jpeg cache decoding) clips while the model runs (0: in this process). Does not change the result.")] = 0,
    shard: Annotated[Optional[str], typer.Option(help="I/N: evaluate only the I-th of N equal parts of the clips (a fixed pseudo-random partition) (e.g. on N machines), then combine the N reports with `robustact merge`; the result equals an unsharded run.")] = None,
):
    """Attack a trained model with an attack suite (attacks × modes × ε) and write a report
    and its per-clip records."""
    with _user_errors():
        from torch.utils.data import Subset

        from robustact.models.checkpoint import load_checkpoint
        from robustact.models.config import ConfigError, ModelConfig
        from robustact.models.evaluate import build_suite, check_suite, default_strategy, evaluate as run_evaluation
        from robustact.models.report import format_report, write_report

        try:
            eps_list = [float(e) for e in _csv(eps)]
        except ValueError:
            raise ConfigError("eps", f"expected comma-separated numbers, got {eps!r}") from None
        if split not in ("train", "test"):
            raise ConfigError("split", "must be train or test")
        specs = [a.lower() for a in _csv(attacks)]  # the CLI forgives case (PGD20); the API is strict
        suite = build_suite(specs, _csv(modes), eps_list, alpha, restarts=restarts)
        strategy = default_strategy(specs) if worst_case_only is None else (
            "worst-case" if worst_case_only else "full")
        net, meta = load_checkpoint(model)
        check_suite(suite, len(meta["class_names"]))
        if (data / "meta.json").is_file():  # checked before the normalisation, whose size follows the layout
            from robustact.models.data.cache import load_meta

            _check_sizes(load_meta(data), ModelConfig.from_dict(meta["model"]))
        dataset = _open_dataset(data, protocol, split, meta.get("normalisation"))
        if list(dataset.class_names) != list(meta["class_names"]):
            raise ValueError("the dataset's classes differ from the model's")
        subset = dataset
        if limit is not None and limit < len(dataset):
            # The class-balanced subset of `reproduce` and the API's max_samples: the same
            # --limit and --seed give the same clips everywhere.
            subset = dataset.subset(limit, seed=seed)
        shard_info = {}
        if shard is not None:
            from robustact.service.shards import shard_positions

            index, count = _shard_spec(shard)
            if count > len(subset):
                raise ConfigError("shard", f"{count} shards for {len(subset)} clips; at most one shard per clip")
            subset = Subset(subset, list(shard_positions(len(subset), index - 1, count)))
            shard_info = {"shard": f"{index}/{count}"}
        model_name = name or (model.parent.name if model.name == "model" else model.name)
        with _progress_bar("evaluating") as update:
            report, records = run_evaluation(
                net, meta, subset, suite, batch_size=batch_size, seed=seed, device=device, strategy=strategy,
                diagnostics=diagnostics, num_workers=loader_workers,
                progress=lambda p: update(p["step"], p["steps"], info=f"clean {p['clean_accuracy']:.1f}%"),
                dataset_info={"cache": str(data), "protocol": protocol, "split": split, **shard_info},
                model_info={"name": model_name, "checkpoint": str(model)})
        _, clips = write_report(report, records, out)
    typer.echo(format_report(report))
    typer.echo(f"report written to {out}, per-clip records to {clips}")


def _shard_spec(value: str) -> tuple[int, int]:
    from robustact.models.config import ConfigError

    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise ConfigError("shard", f"expected I/N (e.g. 2/3), got {value!r}") from None
    if not 1 <= index <= count:
        raise ConfigError("shard", f"I/N needs 1 <= I <= N, got {value!r}")
    return index, count


@app.command()
def merge(
    reports: Annotated[list[Path], typer.Argument(help="The shard reports (JSON written by `evaluate --shard I/N`), their per-clip records beside them.")],
    out: Annotated[Path, typer.Option(help="Report JSON to write; its per-clip records go beside it.")],
):
    """Combine the reports of `evaluate --shard I/N` runs into the report of the whole
    evaluation (the per-clip tables concatenate; every figure is recomputed from them)."""
    with _user_errors():
        from robustact.models.checkpoint import load_checkpoint
        from robustact.models.evaluate import ClipRecords
        from robustact.models.report import build_report, format_report, write_report

        documents = []
        for path in reports:
            document = json.loads(Path(path).read_text())
            clips = Path(path).with_name(document.get("per_clip", {}).get("file") or Path(path).stem + ".clips.npz")
            if not clips.is_file():
                raise FileNotFoundError(f"{path}: its per-clip records {clips} are missing")
            documents.append((document, ClipRecords.load(clips)))
        shards = sorted(d["dataset"].get("shard", "") for d, _ in documents)
        counts = {s.split("/")[1] for s in shards if s}
        if len(counts) != 1 or len(shards) != int(next(iter(counts))) or len(set(shards)) != len(shards):
            raise ValueError(f"expected the reports of shards 1..N of one evaluation, got shards {shards}")
        first = documents[0][0]
        for document, _ in documents[1:]:
            for part in ("model", "dataset"):
                a = {k: v for k, v in first[part].items() if k not in ("shard", "num_samples")}
                b = {k: v for k, v in document[part].items() if k not in ("shard", "num_samples")}
                if a != b:
                    raise ValueError(f"the shard reports are of different {part}s: {a} vs {b}")
        records = ClipRecords.concat([r for _, r in documents])
        checkpoint = first["model"].get("checkpoint")
        net, meta = load_checkpoint(Path(checkpoint))
        dataset_info = {k: v for k, v in first["dataset"].items() if k not in ("shard", "num_samples", "class_names")}
        model_info = {k: v for k, v in first["model"].items() if k in ("name", "checkpoint")}
        report = build_report(records, meta, dataset_info=dataset_info, model_info=model_info,
                              amr_weights=net.amr_weights() if hasattr(net, "amr_weights") else [],
                              config={**first.get("config", {}), "shards": len(documents)})
        _, clips = write_report(report, records, out)
    typer.echo(format_report(report))
    typer.echo(f"merged {len(documents)} shards ({len(records.clip)} clips): report written to {out}, "
               f"per-clip records to {clips}")


@app.command()
def compare(
    reports: Annotated[list[Path], typer.Argument(help="Report JSON files (from `robustact evaluate` or the API).")],
    baseline: Annotated[str, typer.Option(help="Baseline row for RI: an index into REPORTS or a row name.")] = "0",
    attack: Annotated[str, typer.Option(help="Attack whose ✗R/✗S/✗RS columns are shown, e.g. PGD20, CW30, FGSM, APGD-CE100, or worst-case (the per-mode worst case over the whole suite).")] = "PGD20",
    eps: Annotated[Optional[float], typer.Option(help="Budget ε (1/255 units) to pick when a report holds several.")] = None,
    names: Annotated[Optional[str], typer.Option(help="Comma-separated row names (default: the reports' model names).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the comparison as JSON here ('-' for stdout only).")] = None,
):
    """Table-2-style comparison (✓RS ✗R ✗S ✗RS Avg RI, and WC: the overall worst case) of
    several reports, RI against a baseline."""
    with _user_errors():
        from robustact.models.report import compare as build_comparison, format_comparison, load_report

        loaded = [load_report(p) for p in reports]
        row_names = _csv(names) if names else None
        if row_names is not None and len(row_names) != len(loaded):
            raise ValueError(f"--names has {len(row_names)} names for {len(loaded)} reports")
        base: int | str = int(baseline) if baseline.lstrip("-").isdigit() else baseline
        comparison = build_comparison(loaded, baseline=base, attack=attack, eps=eps, names=row_names)
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(comparison, indent=2))
        return
    typer.echo(format_comparison(comparison))
    if json_out is not None:
        json_out.write_text(json.dumps(comparison, indent=2))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where the SQLite file, the file store and the embedded broker live (embedded defaults).")] = Path("./var"),
    worker: Annotated[bool, typer.Option(help="Also start a Celery worker process (off in compose, where workers are separate).")] = True,
):
    """Run the REST API (and, by default, an embedded Celery worker)."""
    from robustact.service.runner import StartupError, serve as run_server

    try:
        run_server(host=host, port=port, data_dir=data_dir, with_worker=worker)
    except StartupError as e:
        _fail(str(e))


@app.command("worker")
def worker_command(
    data_dir: Annotated[Path, typer.Option(help="Data directory for embedded defaults (ignored when ROBUSTACT_* URLs are set).")] = Path("./var"),
):
    """Run a Celery worker that executes training and evaluation jobs."""
    from robustact.service.runner import StartupError, run_worker

    try:
        run_worker(data_dir=data_dir)
    except StartupError as e:
        _fail(str(e))


DataDirOption = Annotated[Path, typer.Option(help="Data directory of the service (embedded defaults; ROBUSTACT_* "
                                                  "URLs override its parts).")]


@contextmanager
def _key_session(data_dir: Path):
    from robustact.service.db import make_engine, make_sessionmaker, migrate
    from robustact.service.runner import _settings

    settings = _settings(data_dir)
    try:
        migrate(settings.database_url)
        engine = make_engine(settings.database_url)
    except Exception as e:  # an unreachable database: one line, not a traceback
        _fail(f"cannot open the database {settings.database_url.split('@')[-1]}: {type(e).__name__}: {e}")
    try:
        with make_sessionmaker(engine)() as session:
            yield session, settings
    finally:
        engine.dispose()


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key: sees every row, manages keys and datasets.")] = False,
    max_active_jobs: Annotated[Optional[int], typer.Option(min=0, help="Quota of queued + running jobs (default: the service's).")] = None,
    max_active_sweeps: Annotated[Optional[int], typer.Option(min=0, help="Quota of active sweeps (default: the service's).")] = None,
    data_dir: DataDirOption = Path("./var"),
):
    """Create a key and print it once (only its hash is stored)."""
    from robustact.service.auth import create_key

    if not name.strip() or len(name) > 200:
        _fail("--name: give 1 to 200 characters")
    with _key_session(data_dir) as (session, _):
        row, key = create_key(session, name.strip(), admin=admin, max_active_jobs=max_active_jobs,
                              max_active_sweeps=max_active_sweeps)
    typer.secho(f"created {'admin ' if admin else ''}key {row.id} ({row.name}); it is shown only now:", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    data_dir: DataDirOption = Path("./var"),
):
    """List keys: id, prefix, name, admin, quotas, created, revoked."""
    from sqlalchemy import select

    from robustact.service.db import ApiKey

    with _key_session(data_dir) as (session, settings):
        query = select(ApiKey).order_by(ApiKey.created_at)
        if not all_keys:
            query = query.where(ApiKey.revoked_at.is_(None))
        rows = session.scalars(query).all()
        typer.echo(f"{'id':32}  {'prefix':10}  {'admin':5}  {'jobs':>5}  {'sweeps':>6}  {'created':19}  "
                   f"{'revoked':19}  name")
        for r in rows:
            jobs = r.max_active_jobs if r.max_active_jobs is not None else settings.max_active_jobs
            sweeps = r.max_active_sweeps if r.max_active_sweeps is not None else settings.max_active_sweeps
            revoked = r.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if r.revoked_at else "-"
            typer.echo(f"{r.id:32}  {r.prefix:10}  {'yes' if r.admin else 'no':5}  {jobs:>5}  {sweeps:>6}  "
                       f"{r.created_at.strftime('%Y-%m-%d %H:%M:%S'):19}  {revoked:19}  {r.name}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Id of the key (see `robustact keys list`).")],
    data_dir: DataDirOption = Path("./var"),
):
    """Revoke a key: requests with it answer 401 from now on; its rows stay."""
    from robustact.service.auth import revoke
    from robustact.service.db import ApiKey

    with _key_session(data_dir) as (session, _):
        row = session.get(ApiKey, key_id)
        if row is None:
            _fail(f"no key {key_id!r} (see `robustact keys list`)")
        if row.revoked_at is not None:
            _fail(f"key {key_id!r} was revoked already")
        revoke(session, row)
    typer.echo(f"revoked key {key_id} ({row.name})")


@app.command()
def report(
    reports: Annotated[list[Path], typer.Argument(help="Report JSON files (from `robustact evaluate` or the API).")],
    out: Annotated[Path, typer.Option(help="HTML page to write (self-contained: inline SVG figures, no scripts).")] = Path("report.html"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the views (robustact.views/v1) as JSON here ('-' for stdout).")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Table-2 baseline: an index into REPORTS or a row name (default: the undefended model, else the first).")] = None,
    attack: Annotated[Optional[str], typer.Option(help="Attack of Table 2, e.g. PGD20, CW30, FGSM (default: PGD20 when present, else the first).")] = None,
    eps: Annotated[Optional[float], typer.Option(help="Table-2 budget ε (1/255 units) when a report holds several.")] = None,
    names: Annotated[Optional[str], typer.Option(help="Comma-separated row names (default: the reports' model names).")] = None,
    title: Annotated[str, typer.Option(help="Page title.")] = "robustact report",
):
    """Figures and tables of the paper (Fig. 2, Tables 1-3, Fig. 4) from reports, as one HTML page."""
    with _user_errors():
        from robustact.models.report import load_report
        from robustact.models.views import build_views, views_html

        loaded = [load_report(p) for p in reports]
        row_names = _csv(names) if names else None
        base: int | str | None = None
        if baseline is not None:
            base = int(baseline) if baseline.lstrip("-").isdigit() else baseline
        views = build_views(loaded, baseline=base, attack=attack, eps=eps, names=row_names)
        page = views_html(views, title=title)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(views, indent=2))
    elif json_out is not None:
        json_out.write_text(json.dumps(views, indent=2))
        typer.echo(f"views written to {json_out}")
    if str(json_out) != "-":
        typer.echo(f"page written to {out}")


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Output folder: data/, runs/, reports/, Tables 1-5 (.md + .json), Figures 2 and 4 (.svg), index.html. Re-running continues an interrupted run.")] = Path("reproduce"),
    size: Annotated[str, typer.Option(help="Plan size: default (about an hour per layout on 2 CPU cores) or small (about a minute; for tests).")] = "default",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic set, initialisation, shuffling and attacks.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N].")] = "auto",
    epochs: Annotated[Optional[int], typer.Option(help="Train every model for this many epochs (overrides the plan's clean and adversarial epochs).")] = None,
    layout: Annotated[str, typer.Option(help="Synthetic set layout: ntu (3-D Kinect skeletons, 25 joints) or imigue (2-D OpenPose JSON, 22 upper-body joints).")] = "ntu",
    models: Annotated[Optional[str], typer.Option(help="Comma-separated model keys (none, rgb, skeleton, at-rs, amr, amr-frozen, ...): train and evaluate only these, e.g. for more seeds of the rows a finding hinges on. The tables wait until every model of the plan has its report.")] = None,
    autoattack: Annotated[bool, typer.Option(help="After PGD and CW, attack every fusion model with AutoAttack (APGD-CE, APGD-DLR, Square5000 as a cascade) in RS, and write autoattack.md: about 1-2 min per model on 2 cores.")] = True,
):
    """Train every defence of the paper on a synthetic set (tiny preset), attack them, and write Tables 1-5 and Figures 2 and 4."""
    with _user_errors():
        from robustact.models.reproduce import plan_for, run_plan, select_models

        plan = plan_for(size, seed=seed, epochs=epochs, layout=layout, autoattack=autoattack)
        chosen = None if models is None else models.split(",")
        select_models(plan, chosen)  # an unknown key is refused before any folder is touched
        with _progress_bar("reproduce") as update:
            def on_progress(p):
                info = f"loss {p['loss']:.3f}" if "loss" in p else (
                    f"clean {p['clean_accuracy']:.1f}%" if "clean_accuracy" in p else "")
                if p.get("phase") == "train":
                    info = f"epoch {p['epoch']}/{p['epochs']} " + info
                update(p["step"], p["steps"], info=info, description=f"[{p['stage']}/{p['stages']}] {p['label'].split(' (')[0]}")

            summary = run_plan(plan, out, device=device, log=typer.echo, progress=on_progress, models=chosen)
    if summary["files"]:
        typer.echo(f"tables, figures and index.html written to {out} in {summary['seconds']:.0f}s")
    else:
        typer.echo(f"{len(summary['models'])} models trained and evaluated in {out} in {summary['seconds']:.0f}s; "
                   "the tables wait for the plan's other models (bench/reproduction_summary.py reads what is there)")


if __name__ == "__main__":
    app()
