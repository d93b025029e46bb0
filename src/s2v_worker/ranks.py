"""The rank processes of a worker with several GPUs: what each of ranks 1..N-1 runs, and what every
rank (rank 0 included) sets up the same way (the torch.distributed groups).

A rank is started by rank 0 (parallel.ParallelGroup.launch) with a `RankSpec`, loads its Denoiser
(the same `Denoiser.load` as rank 0), says ready on its pipe, then serves rank 0's commands: sample
its share of a clip, set a LoRA set, release memory, stop. It dies with rank 0, however that ends.
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch
import torch.distributed as dist

from .attention import SequenceParallel
from .checkpoint import Checkpoint
from .logs import configure_logging
from .memory import MemoryPlan
from .sampling import BRANCHES, ClipRequest, Layout, Role, StopSampling
from .settings import LogLevel, ModelSettings, ParallelSettings, export_to_libraries

logger = logging.getLogger(__name__)

# How long start-up waits for a rank that neither fails nor gets ready: loading a 32 GB DiT from a
# slow network volume takes minutes. (A rank that fails or exits is reported at once.)
START_TIMEOUT_S = 1800.0


class ProcessGroups:
    """The torch.distributed groups, made on every rank in the same order when the ranks start:
    the whole world (rank 0's go/stop after each step, full sequence parallelism) and, for an
    even world, its two halves (sequence parallelism of one guidance branch) and the pairs of
    ranks i, i + N/2 (which compute the same token shard of the two branches)."""

    def __init__(self, world_size: int, timeout_s: float) -> None:
        # Groups of their own rather than the default one: their collectives time out after
        # WAN_S2V_RANK_TIMEOUT_S, while joining (the default group) may take as long as loading.
        def group(ranks: list[int]) -> Any:
            return dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))

        self.world = group(list(range(world_size)))
        self.halves: list[Any] = []
        self.pairs: list[Any] = []
        if world_size % 2 == 0:
            half = world_size // 2
            self.halves = [group(list(range(half))), group(list(range(half, world_size)))]
            self.pairs = [group([i, i + half]) for i in range(half)]

    def role(self, layout: Layout, rank: int) -> Role:
        if layout.cfg_parallel:
            half = layout.world_size // 2
            side, index = divmod(rank, half)
            sequence = SequenceParallel(self.halves[side], index, half) if half > 1 else None
            return Role(branches=(BRANCHES[side],), sequence=sequence, exchange=self.pairs[index],
                        control=self.world, leads=rank == 0)
        return Role(branches=BRANCHES,
                    sequence=SequenceParallel(self.world, rank, layout.world_size),
                    control=self.world, leads=rank == 0)


@dataclass(frozen=True)
class RankSpec:
    """What a rank process needs to start (pickled to it)."""
    rank: int
    world_size: int
    init_method: str
    checkpoint: Checkpoint
    device_type: str  # "cuda" or "cpu"
    model: ModelSettings
    parallel: ParallelSettings
    log_level: LogLevel
    plan: MemoryPlan | None  # rank 0's: every rank keeps its weights the same way
    parent_pid: int  # rank 0's process, which every rank dies with

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def device(self) -> torch.device:
        return torch.device("cuda", self.rank) if self.device_type == "cuda" else torch.device("cpu")


def init_process_group(spec: RankSpec) -> None:
    if spec.backend == "nccl":
        # On a collective's time-out NCCL's watchdog would end the whole process, which for rank
        # 0 is the worker: abort the communicators and raise instead, so the job gets an answer.
        # NVLink multicast (NVLS) is off: it has hung collectives on shared multi-GPU hosts.
        export_to_libraries({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "NCCL_NVLS_ENABLE": "0"},
                            keep_existing=True)
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                            world_size=spec.world_size,
                            timeout=datetime.timedelta(seconds=START_TIMEOUT_S))


class RankWorker:
    """A rank other than 0: its Denoiser (the DiT on its GPU), and what rank 0 can ask of it."""

    def __init__(self, spec: RankSpec) -> None:
        from .denoiser import Denoiser  # the DiT's owner, as every rank builds it

        self.spec = spec
        self.groups = ProcessGroups(spec.world_size, spec.parallel.rank_timeout_s)
        self.denoiser = Denoiser.load(spec.checkpoint, spec.device(), spec.model, spec.plan)

    def sample(self, payload: tuple[ClipRequest, Layout]) -> None:
        request, layout = payload
        try:
            self.denoiser.sample(request, role=self.groups.role(layout, self.spec.rank))
        except StopSampling:  # rank 0 stopped the job after a step: every rank did
            pass

    def set_loras(self, loras: list) -> None:
        self.denoiser.use_loras(loras)

    def release(self, _: Any = None) -> None:
        self.denoiser.release()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """End this process when rank 0's ends, however that ends: a SIGKILL, or a SIGTERM before
    any exit hook could stop the ranks, must not leave a rank holding a GPU (and waiting out
    START_TIMEOUT_S) under PID 1. Linux's parent-death signal does it; it fires when the thread
    that started the rank ends, which is the worker's main thread (Worker.start)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:  # rank 0 ended before the signal was set
        os._exit(1)


def rank_main(spec: RankSpec, conn: Connection) -> None:
    """Entry point of ranks 1..N-1 (a spawned process): start, say ready, serve rank 0."""
    die_with_parent(spec.parent_pid)
    configure_logging(spec.log_level, process=f"rank{spec.rank} ")
    if spec.device_type == "cpu":
        # Every rank shares the machine's cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    try:
        if spec.device_type == "cuda":
            torch.cuda.set_device(spec.device())
        init_process_group(spec)
        worker = RankWorker(spec)
    except BaseException as exc:  # tell rank 0 why, then leave
        logger.exception("rank %d could not start", spec.rank)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"[:1000]))
        return
    conn.send(("ready", None))
    _serve(worker, conn)


def _serve(worker: RankWorker, conn: Connection) -> None:
    commands: dict[str, Callable[[Any], Any]] = {
        "sample": worker.sample, "loras": worker.set_loras, "release": worker.release}
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):  # rank 0 is gone: so is the worker
            return
        if command == "stop":
            dist.destroy_process_group()
            return
        try:
            commands[command](payload)
        except BaseException as exc:
            # Its peers may wait in a collective for it: leaving breaks them out (their
            # collectives fail), and rank 0 reports this message with the job.
            logger.exception("rank %d: %s failed", worker.spec.rank, command)
            conn.send(("error", f"rank {worker.spec.rank}: {command} failed: "
                                f"{type(exc).__name__}: {exc}"[:1000]))
            os._exit(1)
        conn.send(("done", None))
