"""One clip's denoising loop, as every process of the worker runs it.

`WanS2V.generate` samples a clip with a flow-matching solver: at every step the DiT predicts the
noise for the conditional branch and, with classifier-free guidance, for the unconditional one,
the two are mixed (u + scale * (c - u)) and the solver takes a step. `ClipSampler.sample` is that loop, for a
process that computes some of it:

* alone (one GPU): both branches, one after the other, as upstream;
* guidance-parallel: one branch, while the other half of the GPUs computes the other one; the two
  predictions are then exchanged, so every rank mixes the same two tensors and takes the same
  solver step (the latents stay equal on every rank);
* sequence-parallel: a shard of the tokens of each DiT call (dit.py), inside either of the above.

`Role` says which of these a process does. Rank 0 decides after every step whether to go on
(cancellation, time limit) and tells the others, so every rank stops after the same step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from .device import autocast_for, wait_for_gpu
from .dit import ClipConditioning, DiTEngine, SequenceParallel
from .official import import_official

logger = logging.getLogger(__name__)

_official = import_official()
NUM_TRAIN_TIMESTEPS = _official.config.num_train_timesteps
BRANCHES = ("cond", "uncond")

# on_step(step_index, num_steps); may raise to stop sampling after that step.
StepCallback = Callable[[int, int], None]


def reused_steps(num_steps: int, first: int = 3, last: int = 3) -> frozenset[int]:
    """Fast mode's step cache (fixed-interval reuse, as in FORA): the first and last steps are
    always computed, and in between every second step reuses the last computed guided
    prediction. 30 steps: 12 reused, 18 computed. Below 12 steps (distilled few-step LoRAs)
    every step is computed: each one moves the latents too far for a reuse."""
    if num_steps < 12:
        return frozenset()
    return frozenset(range(first + 1, num_steps - last, 2))


def make_scheduler(solver: str, steps: int, shift: float, device: torch.device):
    """(scheduler, timesteps) of the official solver, as `WanS2V.generate` builds them."""
    if solver == "unipc":
        scheduler = _official.fm_solvers_unipc.FlowUniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1, use_dynamic_shifting=False)
        scheduler.set_timesteps(steps, device=device, shift=shift)
        return scheduler, scheduler.timesteps
    if solver == "dpm++":
        fm = _official.fm_solvers
        scheduler = fm.FlowDPMSolverMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1, use_dynamic_shifting=False)
        timesteps, _ = fm.retrieve_timesteps(scheduler, device=device,
                                             sigmas=fm.get_sampling_sigmas(steps, shift))
        return scheduler, timesteps
    raise ValueError(f"unsupported solver {solver!r}")


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


@dataclass
class ClipRequest:
    """One clip's sampling, as rank 0 hands it to every rank: the initial latents, the solver,
    and the DiT's keyword arguments (`WanModel_S2V.forward`'s, x and t aside) of each branch."""
    latents: torch.Tensor            # [16, F, H, W]
    generator_state: torch.Tensor    # of the generator that drew them (scheduler.step gets it)
    solver: str
    steps: int
    shift: float
    guidance_scale: float
    cond: dict[str, Any]
    uncond: dict[str, Any] | None    # None: no guidance
    fast: bool = False             # FP8 GEMMs
    step_cache: bool = False
    float8_attention: bool = False  # FP8 self-attention too ("speed": "fastest")

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    def to(self, device: torch.device) -> "ClipRequest":
        moved = {f.name: _move(getattr(self, f.name), device) for f in fields(self)
                 if f.name != "generator_state"}
        return replace(self, **moved)


@dataclass(frozen=True)
class Layout:
    """How the ranks share one clip: `cfg_parallel` splits the two guidance branches over the two
    halves of the ranks, `sequence_parallel` is how many ranks split each DiT call's tokens."""
    world_size: int
    cfg_parallel: bool
    sequence_parallel: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ALONE = Layout(world_size=1, cfg_parallel=False, sequence_parallel=1)


def plan_layout(world_size: int, cfg_parallel: bool, guided: bool) -> Layout:
    if guided and cfg_parallel and world_size % 2 == 0:
        return Layout(world_size, True, world_size // 2)
    return Layout(world_size, False, world_size)


@dataclass(frozen=True)
class Role:
    """What one process computes of each step. Alone: both branches, no collectives."""
    branches: tuple[str, ...] = BRANCHES
    sequence: SequenceParallel | None = None  # its token shard of every DiT call
    exchange: Any = None   # process group of the ranks computing the two branches of its shard
    control: Any = None    # process group of every rank: rank 0's go/stop after each step
    leads: bool = True     # rank 0: calls on_step and decides whether to go on


class StopSampling(Exception):
    """Raised on the other ranks when rank 0 stopped sampling after a step."""


class ClipSampler:
    """Denoises clips with a `DiTEngine` in the given `Role`."""

    def __init__(self, engine: DiTEngine, device: torch.device, fast_float8: str) -> None:
        self.engine, self.device, self.fast_float8 = engine, device, fast_float8
        self.dit_calls = 0  # DiT calls made by this process, all clips together
        # Seconds of the last clip's denoising loop alone (its DiT calls and solver steps), apart
        # from its preparation: what the duration estimate scales with the step count.
        self.last_steps_s = 0.0

    @torch.no_grad()
    def sample(self, request: ClipRequest, role: Role = Role(),
               on_step: StepCallback | None = None, stop_after: int | None = None) -> torch.Tensor:
        """WanS2V.generate's loop for one clip: its final latents [16, F, H, W] (the same on
        every rank). What in the branches' arguments does not change between steps is computed
        once (DiTEngine.prepare). stop_after: run only the schedule's first steps (the GPU
        faithfulness check compares three)."""
        request = request.to(self.device)
        scheduler, timesteps = make_scheduler(request.solver, request.steps, request.shift,
                                              self.device)
        generator = torch.Generator(device=self.device)
        generator.set_state(request.generator_state)
        inputs = {"cond": request.cond, "uncond": request.uncond}
        with autocast_for(self.device):
            conditioning = {b: self.engine.prepare(**inputs[b], sequence=role.sequence)
                            for b in role.branches if inputs[b] is not None}
        # The step cache (fast modes) reuses the guided prediction on the steps it names.
        reuse = reused_steps(len(timesteps)) if request.step_cache else frozenset()
        latents, noise_pred = request.latents, None
        timesteps = timesteps[:stop_after]
        wait_for_gpu(self.device)  # two waits per clip: the loop's time alone, for the estimate
        loop_start = time.perf_counter()
        for i, t in enumerate(timesteps):
            # The scheduler step stays inside autocast too: upstream runs the whole loop under
            # it, and UniPC's einsum then computes in bfloat16.
            with autocast_for(self.device):
                if i not in reuse or noise_pred is None:
                    noise_pred = self._guided_prediction(latents, torch.stack([t]), conditioning,
                                                         role, request)
                latents = scheduler.step(noise_pred.unsqueeze(0), t, latents.unsqueeze(0),
                                         return_dict=False, generator=generator)[0].squeeze(0)
            self._after_step(role, on_step, i, len(timesteps))
        wait_for_gpu(self.device)
        self.last_steps_s = time.perf_counter() - loop_start
        return latents

    def _guided_prediction(self, latents: torch.Tensor, timestep: torch.Tensor,
                           conditioning: dict[str, ClipConditioning], role: Role,
                           request: ClipRequest) -> torch.Tensor:
        float8 = self.fast_float8 if request.fast else None
        predictions = {}
        for branch, c in conditioning.items():
            predictions[branch] = self.engine.forward(
                [latents], timestep, c, float8=float8,
                float8_attention=request.float8_attention)[0]
            self.dit_calls += 1
        if not request.guided:
            return predictions["cond"]
        if role.exchange is not None:  # guidance-parallel: the other half computed the other one
            (prediction,) = predictions.values()
            both = [torch.empty_like(prediction) for _ in BRANCHES]
            dist.all_gather(both, prediction, group=role.exchange)
            predictions = dict(zip(BRANCHES, both))
        c, u = predictions["cond"], predictions["uncond"]
        return u + request.guidance_scale * (c - u)

    def _after_step(self, role: Role, on_step: StepCallback | None, step: int, steps: int) -> None:
        """Rank 0 reports the step (which may raise to stop); every rank learns whether to go on."""
        stop: BaseException | None = None
        if role.leads and on_step is not None:
            try:
                on_step(step, steps)
            except Exception as exc:  # re-raised below, once the other ranks know
                stop = exc
        if role.control is not None:
            flag = torch.tensor([0 if stop is None else 1], dtype=torch.int32)
            if dist.get_backend(role.control) == "nccl":
                flag = flag.to(self.device)
            dist.broadcast(flag, src=0, group=role.control)
            if not role.leads and flag.item():
                logger.info("rank 0 stopped sampling after step %d of %d", step + 1, steps)
                raise StopSampling
        if stop is not None:
            raise stop
