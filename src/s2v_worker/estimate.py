"""How long a job's sampling will take on this worker: what the duration estimate (`eta_s`, the
refusal of jobs past JOB_TIMEOUT_S) rests on. The worker measures itself (`DiTSpeed`, fed by the
Denoiser after every clip and by the warm-up); nothing here is a constant of some other GPU.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .sampling import reused_steps


def dit_calls_per_step(steps: int, guided: bool, step_cache: bool) -> list[int]:
    """DiT calls each denoising step makes, as `ClipSampler.sample` runs them: two with guidance (conditional
    and unconditional), one without, none on a step that reuses the previous prediction."""
    reuse = reused_steps(steps) if step_cache else frozenset()
    return [0 if i in reuse else (2 if guided else 1) for i in range(steps)]


# A DiT call's cost against its token count n: the GEMMs grow with n, attention with n squared.
# Fitted to the H100 forwards in README (2.89 s at 480p, 29,120 tokens; 7.97 s at 720p, 54,400),
# a*n + b*n^2 has a/b = 24,000 tokens: the count at which attention costs as much as the rest.
ATTENTION_BALANCE_TOKENS = 24_000


def _call_cost(tokens: int) -> float:
    return tokens + tokens * tokens / ATTENTION_BALANCE_TOKENS


@dataclass(frozen=True)
class ClipTiming:
    """One sampled clip, as the duration estimate learns from it."""

    calls: int  # DiT calls, as one process makes them (dit_calls_per_step)
    steps_s: float  # the denoising loop: the DiT calls and the solver's steps
    overhead_s: float  # the rest of the clip's sampling: its conditioning, the hand-off to ranks

    @property
    def seconds_per_call(self) -> float:
        return self.steps_s / self.calls


# A clip of fewer DiT calls than this (a warm-up step, a 1-step job) measures the calls with its
# noise: it counts only until clips of more calls have been measured at that size.
MIN_STEADY_CALLS = 4


class DiTSpeed:
    """Measured seconds per DiT call and per clip's preparation, by token count: what the
    worker's duration estimates rest on.

    Fed by the warm-up (a timed step after the compiling one) and by every clip a job samples:
    its denoising loop (`ClipSampler.last_steps_s`) over its DiT calls, and the rest of its
    sampling time (preparation, the ranks' hand-off) apart, so that a short job's fixed costs do
    not pass for slow calls. Each is the median of the `keep` most recent clips at that token
    count, the calls' over the clips of at least MIN_STEADY_CALLS calls when there are any: one
    odd job moves neither. A token count never measured is scaled from the nearest measured one
    (calls by `_call_cost`, preparation by the tokens). The input is only (tokens, timing), so a
    multi-GPU sampler feeds it the same way.
    """

    def __init__(self, keep: int = 8, sizes: int = 16) -> None:
        self.keep, self.sizes = keep, sizes
        self._clips: dict[int, list[ClipTiming]] = {}  # tokens -> recent clips, most recent last

    def record(self, tokens: int, timing: ClipTiming) -> None:
        if timing.calls <= 0:
            return
        clips = self._clips.pop(tokens, [])  # re-inserted: the most recently measured size last
        self._clips[tokens] = (clips + [timing])[-self.keep:]
        while len(self._clips) > self.sizes:
            del self._clips[next(iter(self._clips))]

    def rates(self, tokens: int) -> tuple[float, float] | None:
        """(seconds per DiT call, seconds of overhead per clip) at `tokens`; None: none yet."""
        if not self._clips:
            return None
        nearest = min(self._clips, key=lambda measured: abs(math.log(measured / tokens)))
        clips = self._clips[nearest]
        steady = [c for c in clips if c.calls >= MIN_STEADY_CALLS] or clips
        per_call = statistics.median(c.seconds_per_call for c in steady)
        overhead = statistics.median(c.overhead_s for c in clips)
        if nearest == tokens:
            return per_call, overhead
        return per_call * _call_cost(tokens) / _call_cost(nearest), overhead * tokens / nearest


@dataclass(frozen=True)
class SamplingEstimate:
    """How long a job's sampling should take on this worker, from `DiTSpeed`."""

    tokens: int  # per DiT call
    clips: int
    seconds_per_call: float
    overhead_per_clip_s: float
    calls_by_step: tuple[int, ...]  # one clip's

    @property
    def calls(self) -> int:
        """DiT calls of all clips together."""
        return self.clips * sum(self.calls_by_step)

    @property
    def seconds(self) -> float:
        return self.calls * self.seconds_per_call + self.clips * self.overhead_per_clip_s

    def remaining_s(self, clip: int, clips: int, step: int) -> float:
        """Seconds of sampling left once `step` of `clip` (both from 0) is done."""
        later_clips = clips - clip - 1
        calls_left = later_clips * sum(self.calls_by_step) + sum(self.calls_by_step[step + 1:])
        return calls_left * self.seconds_per_call + later_clips * self.overhead_per_clip_s
