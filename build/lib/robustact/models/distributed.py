"""Data-parallel training: DistributedDataParallel over torch.distributed (gloo on CPU, NCCL on
CUDA), one process per CPU share or per GPU, on one machine or many.

How a run is split, so that N processes train the model one process would:

* Batches. The global batch is ``TrainConfig.batch_size``. Every rank draws the epoch's
  shuffled order from the same generator as single-process training (``RankBatches``), cuts
  each global batch into ``world`` equal contiguous blocks and takes block ``rank``. A batch
  size that does not split evenly is refused (``ConfigError`` on ``batch_size``).
* Loss and gradients. Each rank's loss is the mean over its block; DDP averages the gradients
  over ranks, which over equal blocks is the gradient of the global mean. The loss, accuracy
  and divergence check use sums all-reduced every step, so every rank logs the same record and
  all stop together on a NaN.
* Adversarial examples. Each rank attacks its own block, with the raw model (not the DDP
  wrapper) in eval mode, where clips do not interact. The step's attack seed is the same on
  every rank and the random start is drawn for the whole global batch and sliced
  (``attack(..., shard=(start, total))``), so a clip starts where single-process training
  starts it.
* What still differs from one process: dropout masks are drawn per rank, and BatchNorm (I3D)
  normalises with the statistics of the rank's block unless ``sync_batchnorm`` (CUDA only:
  PyTorch's SyncBatchNorm has no CPU kernels). Running statistics are averaged over ranks
  after every step, so all ranks attack with the same eval-mode network.
* Checkpoints. Rank 0 writes ``last/`` and ``model/`` and calls ``on_checkpoint`` /
  ``progress``; the others wait at a barrier. On resume rank 0 reads ``last/`` and broadcasts
  it, so only rank 0's machine needs the run directory. ``should_stop`` is asked on rank 0 and
  its answer broadcast every step, so all ranks stop at the same step.

Two ways in: ``train_data_parallel`` spawns ``nproc`` local processes (the CLI's ``--nproc``,
a worker with several GPUs); or processes started by ``torchrun`` call ``join_process_group``
and then ``models.train.train`` (``robustact train`` does both by itself).
"""

from __future__ import annotations

import inspect
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from .checkpoint import resolve_device
from .config import ConfigError, ModelConfig, TrainConfig

LOG_DIR = "logs"


class DistributedError(RuntimeError):
    """A rank of a data-parallel run failed or died; the run was ended on every rank."""


# ------------------------------------------------------------------------------ inside a run


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel group; rank 0 of 1 without torch.distributed.
    Every collective is a no-op for a single process."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls, device: torch.device) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(0, 1, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, local_batch: int) -> tuple[int, int] | None:
        """(first row, global batch size) of this rank's block, for the attack's random start."""
        return None if self.world == 1 else (self.rank * local_batch, local_batch * self.world)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def from_main(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @torch.no_grad()
    def average_batchnorm_statistics(self, model: nn.Module) -> None:
        """Average BatchNorm running means and variances over ranks (one all-reduce). Each rank
        updated them from its own block; the mean of the block means is the global batch's mean
        (the mean of the variances leaves out the spread between blocks)."""
        if self.world == 1:
            return
        stats = [s for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                 and m.track_running_stats for s in (m.running_mean, m.running_var)]
        if not stats:
            return
        flat = torch.cat([s.reshape(-1) for s in stats])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for s in stats:
            s.copy_(flat[offset:offset + s.numel()].view_as(s))
            offset += s.numel()

    @torch.no_grad()
    def check_in_step(self, model: nn.Module) -> None:
        """Raise ``DistributedError`` unless every rank holds the same weights and buffers
        (a checksum compared with one all-reduce): a rank that drifted would train on silently."""
        if self.world == 1:
            return
        total = sum(v.detach().double().sum() for v in model.state_dict().values() if v.is_floating_point())
        t = torch.stack([total, -total]).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0].item() != -t[1].item():
            raise DistributedError(f"the ranks' weights differ (checksums {-t[1].item()!r} to {t[0].item()!r})")

    def wrap(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        """``module`` in DistributedDataParallel (itself for a single process). Buffers are not
        synchronised by DDP's forward: ``average_batchnorm_statistics`` keeps them equal."""
        if self.world == 1:
            return module
        ddp = nn.parallel.DistributedDataParallel
        # ``broadcast_buffers`` is deprecated from PyTorch 2.13 on, its successor absent before.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else {"broadcast_buffers": False})
        return ddp(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters, **no_buffer_sync)


class RankBatches(Sampler[list[int]]):
    """The mini-batches of single-process training (``shuffle=True`` from ``generator``, the
    last short batch dropped when the set holds more than one batch), each cut into ``world``
    equal contiguous blocks; yields block ``rank`` of each. With ``world`` 1 it is exactly the
    sampler a shuffling DataLoader builds."""

    def __init__(self, dataset, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        self.batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size,
                                    drop_last=len(dataset) > batch_size)
        self.rank, self.world = rank, world

    def __iter__(self):
        for batch in self.batches:
            size = len(batch) // self.world
            yield batch[self.rank * size:(self.rank + 1) * size]

    def __len__(self) -> int:
        return len(self.batches)


def check_global_batch(batch_size: int, num_samples: int, world: int) -> None:
    """Refuse a global batch that does not split evenly over ``world`` processes."""
    if world == 1:
        return
    if batch_size % world:
        raise ConfigError("batch_size", f"the global batch of {batch_size} clips does not split evenly over "
                                        f"{world} processes; use a multiple of {world}")
    if num_samples < batch_size and num_samples % world:
        raise ConfigError("batch_size", f"the training set holds {num_samples} clips, fewer than batch_size "
                                        f"{batch_size}, so its one batch of {num_samples} does not split evenly "
                                        f"over {world} processes")


def check_sync_batchnorm(sync_batchnorm: bool, device: torch.device) -> None:
    if sync_batchnorm and device.type != "cuda":
        raise ConfigError("sync_batchnorm", "needs CUDA: PyTorch's SyncBatchNorm has no CPU kernels. Without it "
                                            "each process normalises with the statistics of its own part of the batch")


# ------------------------------------------------------------------------------ torchrun


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun (or any
    launcher setting RANK / WORLD_SIZE / LOCAL_RANK), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def join_process_group(device: str | None = "auto", timeout: timedelta = timedelta(minutes=30)) -> torch.device:
    """Join the process group torchrun set up (``env://``: MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE): NCCL with GPU ``LOCAL_RANK`` when CUDA is used, else gloo. Returns this
    process's device; call ``dist.destroy_process_group()`` when done."""
    launched = torchrun_rank()
    if launched is None:
        raise RuntimeError("RANK and WORLD_SIZE are not set: not started by torchrun")
    rank, world, local_rank = launched
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=rank,
                            world_size=world, timeout=timeout)
    return dev


# ------------------------------------------------------------------------------ local launcher


@dataclass(frozen=True)
class _Job:
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    dataset_factory: Callable[[], Any]
    out_dir: str
    preset: str | None
    resume: bool
    sync_batchnorm: bool
    threads: int
    timeout_s: float
    relay_checkpoints: bool


def train_data_parallel(model_cfg: ModelConfig, train_cfg: TrainConfig, dataset_factory: Callable[[], Any],
                        out_dir: str | Path, *, nproc: int, device: str | None = "auto",
                        devices: list[int] | None = None, preset: str | None = None,
                        progress: Callable[[dict], None] | None = None,
                        should_stop: Callable[[], bool] | None = None,
                        on_checkpoint: Callable[[Path, int], None] | None = None,
                        resume: bool = True, sync_batchnorm: bool = False, threads: int | None = None,
                        timeout_s: float = 3600.0) -> dict[str, Any]:
    """``models.train.train`` on ``nproc`` local processes (DDP); returns rank 0's summary.

    ``dataset_factory``: a picklable zero-argument callable building the training set in each
    process (e.g. ``functools.partial(ClipDataset, cache, protocol="xsub", split="train")``).
    Device: CPU → gloo, ``threads`` torch threads per process (default: the cores shared out);
    CUDA → NCCL, rank r on GPU ``devices[r]`` (default 0…nproc-1). ``progress``,
    ``should_stop`` and ``on_checkpoint`` run in this process: rank 0 sends its progress here,
    waits while ``on_checkpoint`` handles each ``last/`` it wrote, and a true ``should_stop()``
    (polled about every 0.1 s) stops every rank at its next step with ``TrainingCancelled``.
    A rank that fails ends all of them: its error is raised here (``TrainingCancelled``,
    ``TrainingDiverged``, ``ConfigError``, ``ValueError`` as themselves, anything else as
    ``DistributedError`` naming the rank); each rank's output goes to ``out_dir/logs/``.
    ``nproc`` 1 trains in this process.
    """
    from .train import train

    if nproc < 1:
        raise ConfigError("nproc", "must be at least 1")
    check_global_batch(train_cfg.batch_size, train_cfg.batch_size, nproc)
    dev = resolve_device(device)
    check_sync_batchnorm(sync_batchnorm and nproc > 1, dev)
    if dev.type == "cuda":
        devices = list(devices) if devices is not None else list(range(nproc))
        if len(devices) < nproc or max(devices[:nproc]) >= torch.cuda.device_count():
            raise ConfigError("nproc", f"{nproc} processes need {nproc} GPUs; devices {devices[:nproc]} of "
                                       f"{torch.cuda.device_count()} visible")
        rank_devices = [f"cuda:{i}" for i in devices[:nproc]]
    else:
        rank_devices = ["cpu"] * nproc
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    if nproc == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train(model_cfg, train_cfg, dataset_factory(), out_dir, preset=preset, progress=progress,
                         should_stop=should_stop, on_checkpoint=on_checkpoint, device=rank_devices[0], resume=resume)
        finally:
            torch.set_num_threads(before)

    out_dir = Path(out_dir)
    (out_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    job = _Job(model_cfg, train_cfg, dataset_factory, str(out_dir), preset, resume, sync_batchnorm, threads,
               timeout_s, on_checkpoint is not None)
    # The rendezvous store lives here, on a port the OS picks: no free-port race.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    ctx = mp.get_context("spawn")
    events, acks, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_rank_main, name=f"robustact-rank{r}", daemon=True,
                         args=(r, nproc, rank_devices[r], store.port, os.getpid(), job, events, acks, stop))
             for r in range(nproc)]
    done: dict[int, Any] = {}
    errors: dict[int, dict] = {}
    first_failure = None
    next_poll = 0.0
    try:
        for p in procs:
            p.start()
        while len(done) < nproc:
            try:
                message = events.get(timeout=0.1)
            except queue.Empty:
                message = None
            if message is not None:
                kind = message[0]
                if kind == "progress" and progress is not None:
                    progress(message[1])
                elif kind == "checkpoint":
                    if on_checkpoint is not None:
                        on_checkpoint(Path(message[1]), message[2])
                    acks.put(True)
                elif kind == "done":
                    done[message[1]] = message[2]
                elif kind == "error":
                    errors.setdefault(message[1], message[2])
            if should_stop is not None and not stop.is_set() and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.1
                if should_stop():
                    stop.set()
            if message is not None:
                continue  # drain the queue before judging the processes
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) or (p.exitcode == 0 and r not in done)]
            if (errors or failed) and first_failure is None:
                first_failure = time.monotonic()
            # After a failure, wait briefly for the other ranks' messages (to tell the cause from
            # its echoes), then end the run: survivors may be blocked in a collective for good.
            if first_failure is not None and (time.monotonic() - first_failure > 2.0
                                              or all(p.exitcode is not None for p in procs)):
                for r in failed:
                    errors.setdefault(r, {"type": None, "message": _exit_reason(procs[r].exitcode)})
                break
    finally:
        _end(procs, grace=10.0 if len(done) == nproc else 0.0)
        for q in (events, acks):
            q.cancel_join_thread()
            q.close()
    if len(done) < nproc:
        raise _failure(errors, nproc, out_dir)
    return done[0]


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _end(procs, grace: float) -> None:
    """Let finished ranks exit for ``grace`` seconds, then terminate (and at last kill) the rest."""
    procs = [p for p in procs if p.pid is not None]  # started
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _failure(errors: dict[int, dict], world: int, out_dir: Path) -> BaseException:
    """The exception to raise for a failed run: the cause, not the other ranks' echoes of it
    (a peer's broken connection, its process being ended)."""
    from .train import TrainingCancelled, TrainingDiverged

    if not errors:
        return DistributedError(f"the data-parallel run ended without a result (logs: {out_dir / LOG_DIR})")
    ranked = sorted(errors.items(), key=lambda item: (item[1].get("secondary", True), item[0]))
    rank, error = ranked[0]
    kind, message = error.get("type"), error["message"]
    if kind == "ConfigError":
        return ConfigError(error["field"], error["field_message"])
    same = {"TrainingCancelled": TrainingCancelled, "TrainingDiverged": TrainingDiverged, "ValueError": ValueError,
            "FileNotFoundError": FileNotFoundError}
    if kind in same:
        return same[kind](message)
    what = f"{kind}: {message}" if kind else message
    return DistributedError(f"rank {rank} of {world} failed: {what} (log: {out_dir / LOG_DIR / f'rank{rank}.log'})")


def _describe(e: BaseException) -> dict:
    info = {"type": type(e).__name__, "message": str(e),
            "secondary": isinstance(e, dist.DistError) or "Connection closed by peer" in str(e)}
    if isinstance(e, ConfigError):
        info.update(field=e.field, field_message=e.message)
    return info


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _rank_main(rank: int, world: int, device: str, port: int, parent_pid: int, job: _Job,
               events, acks, stop) -> None:
    """One rank of ``train_data_parallel`` (a spawned process)."""
    from .train import train

    log = os.open(Path(job.out_dir) / LOG_DIR / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    main = rank == 0

    def on_checkpoint(path: Path, epoch: int) -> None:
        events.put(("checkpoint", str(path), epoch))
        acks.get()  # the parent has handled it (e.g. uploaded last/) before the next epoch

    try:
        torch.set_num_threads(job.threads)
        timeout = timedelta(seconds=job.timeout_s)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout)
        summary = train(job.model_cfg, job.train_cfg, job.dataset_factory(), job.out_dir, preset=job.preset,
                        progress=(lambda info: events.put(("progress", info))) if main else None,
                        should_stop=stop.is_set if main else None,
                        on_checkpoint=on_checkpoint if main and job.relay_checkpoints else None,
                        device=device, resume=job.resume, sync_batchnorm=job.sync_batchnorm)
        dist.destroy_process_group()
        events.put(("done", rank, summary if main else None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which ends the run
        traceback.print_exc()
        sys.stderr.flush()
        events.put(("error", rank, _describe(e)))
        events.close()
        events.join_thread()
        os._exit(1)  # no process-group teardown: a peer may be gone
