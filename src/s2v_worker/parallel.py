"""Several GPUs per worker: every rank samples each job's clips together with the worker's process.

The worker's own process (the RunPod handler) is rank 0. When the worker starts on N GPUs it starts
ranks 1..N-1 itself (torch.multiprocessing, spawn), one process per GPU; each loads the DiT onto its
own GPU and then waits for rank 0's commands on a pipe (ranks.py is what they run; this module is
rank 0's side). The text encoder, audio encoder and VAE
live on rank 0 only: rank 0 validates the job, fetches the media, encodes text, audio and image,
hands each clip's inputs to the other ranks, and after sampling decodes and delivers the video.

Layout of a clip (`Layout`, chosen per job): with guidance on and N even, the conditional and the
unconditional DiT calls run at once on the two halves of the ranks (guidance-parallel); inside each
half, or over all N ranks when guidance is off (or WAN_S2V_CFG_PARALLEL=off), every DiT call's
tokens are split across the ranks with Ulysses sequence parallelism (dit.py). All ranks run the
same steps in lockstep (sampling.py); the latents are equal on every rank.

Communication: commands and each clip's inputs go over a pipe per rank (pickled, CPU tensors);
the sampling itself over torch.distributed (NCCL on GPUs, gloo on the CPU, where the tests run).
Faults: a rank that dies, raises or stops answering (WAN_S2V_RANK_TIMEOUT_S) makes the group
unusable; the job ends with an error and `refresh_worker`, every rank is stopped, and so is every
later job of this worker (RunPod replaces it). A rank that cannot start fails the worker's start-up
with its reason.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import os
import socket
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .checkpoint import Checkpoint
from .errors import JobError
from .memory import MemoryPlan
from .ranks import START_TIMEOUT_S, ProcessGroups, RankSpec, init_process_group, rank_main
from .sampling import ClipRequest, ClipSampler, Layout, StepCallback, plan_layout
from .settings import LogLevel, ModelSettings, ParallelSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
STOP_GRACE_S = 10.0  # how long a rank may take to leave when told to
EXIT_REAP_S = 2.0  # how long an exiting rank (its pipes closed) may take to be reaped


class RankFailure(JobError, RuntimeError):
    """A rank died, raised or stopped answering: the group cannot sample any more, so the job
    says so and asks RunPod for a fresh worker."""

    refresh_worker = True

    def __str__(self) -> str:
        return f"{super().__str__()}; this worker will be replaced"


def check_world_size(world_size: int, num_heads: int) -> None:
    """Ulysses gives each rank a share of the attention heads: N must divide them (for the
    14B DiT's 40 heads: 1, 2, 4, 5, 8, ...). Guidance-parallel halves then divide them too."""
    if world_size < 1 or num_heads % world_size:
        divisors = [n for n in range(1, num_heads + 1) if num_heads % n == 0 and n <= 8]
        raise ValueError(f"WAN_S2V_WORLD_SIZE={world_size}: the DiT's {num_heads} attention heads "
                         f"cannot be split {world_size} ways; use one of "
                         f"{', '.join(map(str, divisors))}")


def resolve_world_size(setting: int | None, device: torch.device, num_heads: int) -> int:
    """WAN_S2V_WORLD_SIZE: 'auto' (None) = every visible CUDA GPU (the largest count that divides
    the heads), or a number (on the CPU: that many processes over gloo, as the tests run it)."""
    if setting is None:
        if device.type != "cuda":
            return 1
        visible = torch.cuda.device_count()
        return max(n for n in range(1, visible + 1) if num_heads % n == 0)
    world_size = int(setting)
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"WAN_S2V_WORLD_SIZE={world_size} but only {torch.cuda.device_count()} "
                         "CUDA GPU(s) are visible")
    check_world_size(world_size, num_heads)
    return world_size


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- rank 0 ----------------------------------------------------------------------------------------

class ParallelGroup:
    """Rank 0's handle on the other ranks: starts them, sends them work, and watches them."""

    def __init__(self, spec: RankSpec, processes: list, conns: list[Connection]) -> None:
        self.spec = spec
        self.world_size = spec.world_size
        self.timeout_s = spec.parallel.rank_timeout_s
        self.cfg_parallel = spec.parallel.cfg_parallel
        self.processes, self.conns = processes, conns
        self.groups: ProcessGroups | None = None
        self.failure: str | None = None  # why the group is unusable, once it is

    # --- start-up ------------------------------------------------------------------------------

    @classmethod
    def launch(cls, checkpoint: Checkpoint, world_size: int, device: torch.device,
               model: ModelSettings, parallel: ParallelSettings, log_level: LogLevel,
               plan: MemoryPlan | None = None,
               entry: Callable[[RankSpec, Connection], None] = rank_main) -> "ParallelGroup":
        """Start ranks 1..N-1 (they load their DiTs while this process loads the pipeline) and
        join them in the process group. `entry` is the ranks' main function (tests replace it)."""
        spec = RankSpec(rank=0, world_size=world_size,
                        init_method=f"tcp://127.0.0.1:{_free_port()}", checkpoint=checkpoint,
                        device_type=device.type, model=model, parallel=parallel,
                        log_level=log_level, plan=plan, parent_pid=os.getpid())
        context = mp.get_context("spawn")
        group = cls(spec, [], [])
        # The ranks are not daemons (they start processes of their own: compile workers, pose
        # decoding), and multiprocessing joins such children when this process exits: stop them
        # first, or `python handler.py --test_input ...` never ends. Hooks run last-in first-out,
        # so this one runs before multiprocessing's. Registered, and each rank listed, before the
        # rank starts: a signal at any moment after leaves no rank that this hook does not stop
        # (multiprocessing would wait on it for ever).
        atexit.register(group.close)
        for rank in range(1, world_size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=entry, name=f"wan-s2v-rank{rank}",
                                      args=(replace(spec, rank=rank), child_end))
            group.processes.append(process)
            group.conns.append(parent_end)
            process.start()
            child_end.close()
        logger.info("started %d rank process(es) for %d %s devices", world_size - 1, world_size,
                    device.type)
        group._join()
        return group

    def _join(self) -> None:
        """Join the process group (rank 0's side); fails at once when a rank fails to start."""
        joined: dict[str, BaseException | None] = {}

        def join() -> None:
            try:
                init_process_group(self.spec)
                self.groups = ProcessGroups(self.world_size, self.timeout_s)
                joined["error"] = None
            except BaseException as exc:
                joined["error"] = exc

        thread = threading.Thread(target=join, name="wan-s2v-join", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.2)
            self._check_alive(deadline, starting=range(1, self.world_size))
        if joined["error"] is not None:
            self._fail_start(f"joining the process group failed: {joined['error']}")

    def wait_ready(self) -> None:
        """Wait until every rank has loaded its DiT; raise with the reason when one cannot."""
        waiting = set(range(1, self.world_size))
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            multiprocessing.connection.wait(
                [*(self.conns[r - 1] for r in waiting),
                 *(self.processes[r - 1].sentinel for r in waiting)], timeout=1.0)
            for rank in sorted(waiting):
                received = _message(self.conns[rank - 1])
                if received is not None:
                    if received[0] != "ready":
                        self._fail_start(f"rank {rank} could not start: {received[1]}")
                    waiting.discard(rank)
            self._check_alive(deadline, starting=waiting)
        logger.info("all %d ranks ready", self.world_size)

    def _check_alive(self, deadline: float, starting) -> None:
        for rank in starting:
            process, conn = self.processes[rank - 1], self.conns[rank - 1]
            if not process.is_alive():
                message, detail = _message(conn) or ("", "")
                why = detail if message == "failed" else f"exit code {process.exitcode}"
                self._fail_start(f"rank {rank} could not start: {why}")
        if time.monotonic() > deadline:
            self._fail_start(f"the ranks did not start within {START_TIMEOUT_S:g} s")

    def _fail_start(self, reason: str) -> None:
        self.failure = reason
        self.close()
        raise RuntimeError(f"the worker's {self.world_size} ranks could not start: {reason}")

    # --- jobs ----------------------------------------------------------------------------------

    def layout(self, guided: bool) -> Layout:
        return plan_layout(self.world_size, self.cfg_parallel, guided)

    def check(self) -> None:
        """Raise RankFailure once the group is unusable."""
        if self.failure is not None:
            raise RankFailure(self.failure)

    def sample(self, sampler: ClipSampler, request: ClipRequest,
               on_step: StepCallback | None = None) -> torch.Tensor:
        """One clip on every rank; rank 0's share runs here. Its final latents."""
        layout = self.layout(request.guided)
        role = self.groups.role(layout, 0)
        stops: list[BaseException] = []

        def step(index: int, steps: int) -> None:
            try:
                on_step(index, steps)
            except BaseException as exc:  # the sampler stops every rank after this step
                stops.append(exc)
                raise

        return self.run("sample", (request.to(torch.device("cpu")), layout),
                        lambda: sampler.sample(request, role, step if on_step else None),
                        clean_stops=stops)

    def set_loras(self, loras: list) -> None:
        self.run("loras", loras, lambda: None)

    def release(self) -> None:
        """Free cached GPU memory on every rank (after a failed job)."""
        if self.failure is None:
            self.run("release", None, lambda: None)

    def run(self, command: str, payload: Any, local: Callable[[], T],
            clean_stops: list[BaseException] = ()) -> T:
        """Send `command` to every rank, run rank 0's share (`local`), then wait for every rank
        to finish. Any fault makes the group unusable and raises RankFailure; an exception of
        `local` that every rank got through together (one in `clean_stops`: a stop after a
        sampling step) is re-raised as it is once they have."""
        if self.failure is not None:
            raise RankFailure(self.failure)
        for conn in self.conns:
            conn.send((command, payload))
        watching = threading.Event()
        watching.set()
        threading.Thread(target=self._watch, args=(watching,), name="wan-s2v-watchdog",
                         daemon=True).start()
        try:
            result = local()
        except BaseException as exc:
            if not any(exc is stop for stop in clean_stops):
                # Rank 0 left in the middle (the others may wait in a collective for it), most
                # likely because another rank failed first: name that one when it did.
                self._break(self._rank_fault(command) or
                            f"rank 0: {command} failed: {type(exc).__name__}: {exc}"[:1000])
                raise RankFailure(self.failure) from exc
            self._collect(command)
            raise
        finally:
            watching.clear()
        self._collect(command)
        return result

    def _collect(self, command: str) -> None:
        """Every rank's answer to `command`; a missing or failed one breaks the group."""
        waiting = set(range(1, self.world_size))
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._break(f"rank(s) {sorted(waiting)} did not finish {command} within "
                            f"{self.timeout_s:g} s (WAN_S2V_RANK_TIMEOUT_S)")
            else:
                multiprocessing.connection.wait(
                    [*(self.conns[r - 1] for r in waiting),
                     *(self.processes[r - 1].sentinel for r in waiting)],
                    timeout=min(remaining, 1.0))
            for rank in sorted(waiting):
                received = _message(self.conns[rank - 1]) if self.failure is None else None
                if received is not None:
                    if received[0] != "done":
                        self._break(received[1])
                    waiting.discard(rank)
                elif self.failure is None and not self.processes[rank - 1].is_alive():
                    self._break(f"rank {rank} exited during {command} (exit code "
                                f"{self.processes[rank - 1].exitcode})")
            if self.failure is not None:
                raise RankFailure(self.failure)

    def _rank_fault(self, command: str, grace_s: float = 5.0) -> str | None:
        """The first other rank's error or exit, waiting up to `grace_s` for one to show."""
        multiprocessing.connection.wait([*self.conns, *(p.sentinel for p in self.processes)],
                                        timeout=grace_s)
        for rank, (conn, process) in enumerate(zip(self.conns, self.processes), start=1):
            received = _message(conn)
            if received is not None and received[0] == "error":
                return received[1]
            if multiprocessing.connection.wait([conn, process.sentinel], timeout=0):
                # Its pipes closed: it is exiting. They close a moment before the process can
                # be reaped, and rank 0's collective can fail within that moment.
                process.join(EXIT_REAP_S)
            if not process.is_alive():
                return f"rank {rank} exited during {command} (exit code {process.exitcode})"
        return None

    def _watch(self, watching: threading.Event) -> None:
        """While rank 0 waits in a collective, a rank that exits would leave it waiting until the
        collective's time-out under NCCL (gloo fails at once): abort the process group instead,
        which fails that wait."""
        sentinels = [p.sentinel for p in self.processes]
        while watching.is_set():
            if multiprocessing.connection.wait(sentinels, timeout=0.5):
                if watching.is_set() and self.spec.backend == "nccl":
                    logger.error("a rank exited during a command: aborting the process group")
                    _abort_process_group()
                return

    def _break(self, reason: str) -> None:
        self.failure = f"the worker's GPU group failed: {reason}"
        logger.error("%s; stopping every rank", self.failure)
        self._stop_processes(graceful=False)

    # --- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every rank (the worker is shutting down, or could not start)."""
        self._stop_processes(graceful=self.failure is None)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _stop_processes(self, graceful: bool) -> None:
        if graceful:
            for conn in self.conns:
                try:
                    conn.send(("stop", None))
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + STOP_GRACE_S
            for process in self.started():
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.started():
            if process.is_alive():
                process.kill()  # SIGKILL: also ends a rank stopped or stuck in a collective
            process.join(STOP_GRACE_S)

    def started(self) -> list:
        """The rank processes that exist (a signal may end the start-up between listing a rank
        and starting it)."""
        return [process for process in self.processes if process.pid is not None]



def _message(conn: Connection) -> tuple[str, Any] | None:
    """The next message from a rank when one is waiting; None when none is, or the rank is gone
    (a closed pipe reads as ready)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


def _abort_process_group() -> None:
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None:
        try:
            abort()
        except Exception:  # already torn down
            logger.debug("aborting the process group failed", exc_info=True)
