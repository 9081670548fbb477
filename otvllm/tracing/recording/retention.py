"""Which steps of a call get their own spans, decided after each step ends.

Every step is measured (StepStats). A step is *detailed* (its step and phase spans are
kept) when it is among the first steps of the call, a prefill, a preemption, an error, an
eager fallback, slow (over `slow_factor` times the running median of its phase, or among
the slowest so far), or among the last steps of the call (known only when the call ends,
so the newest undecided steps wait in a small ring). Runs of steps that are not detailed
become one aggregate span each (StepStretch), so the timeline has no holes."""

import heapq
import math
from collections import deque
from dataclasses import dataclass

from otvllm.environment import read as read_environment
from otvllm.tracing import schema as S

SLOWEST_KEPT = 8            # the slowest steps so far, per phase
MEDIAN_WINDOW = 64          # steps of a phase in the running median
STRETCH_MAX_NS = 2_000_000_000   # an aggregate span is closed after this long, to stay live


@dataclass(slots=True)
class StepSummary:
    """The few numbers kept for every step."""

    index: int
    phase: str
    start_ns: int
    end_ns: int
    num_seqs: int
    num_tokens: int
    preempted: bool
    failed: bool
    eager_fallback: bool

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class StepStats:
    """Step-time statistics over every step of a call."""

    def __init__(self):
        self.durations_ns: list[int] = []
        self.slowest: StepSummary | None = None

    def add(self, step: StepSummary) -> None:
        self.durations_ns.append(step.duration_ns)
        if self.slowest is None or step.duration_ns > self.slowest.duration_ns:
            self.slowest = step

    def attrs(self) -> dict:
        d = sorted(self.durations_ns)
        if not d:
            return {S.STEPS_COUNT: 0}

        def pct(q: float) -> float:
            return d[min(len(d) - 1, math.ceil(q * len(d)) - 1)] / 1e6

        return {S.STEPS_COUNT: len(d), S.STEP_TIME_MEAN_MS: sum(d) / len(d) / 1e6,
                S.STEP_TIME_P50_MS: pct(0.5), S.STEP_TIME_P99_MS: pct(0.99), S.STEP_TIME_MAX_MS: d[-1] / 1e6,
                S.SLOWEST_STEP_INDEX: self.slowest.index}


class _PhaseHistory:
    def __init__(self):
        self.recent: deque[int] = deque(maxlen=MEDIAN_WINDOW)
        self.slowest: list[int] = []   # min-heap of the largest durations so far
        self.median = 0
        self._since_median = 0

    def add(self, duration: int) -> None:
        self.recent.append(duration)
        self._since_median += 1
        if self._since_median >= 8 or len(self.recent) < 8:
            self.median = sorted(self.recent)[len(self.recent) // 2]
            self._since_median = 0
        if len(self.slowest) < SLOWEST_KEPT:
            heapq.heappush(self.slowest, duration)
        elif duration > self.slowest[0]:
            heapq.heapreplace(self.slowest, duration)


class RetentionPolicy:
    def __init__(self, every_step: bool, first_index: int = 0):
        self.every_step = every_step
        self.first_index = first_index   # the index of the call's (or window's) first step
        self.first = read_environment("OTVLLM_TRACE_FIRST_STEPS")
        self.last = read_environment("OTVLLM_TRACE_LAST_STEPS")
        self.slow_factor = read_environment("OTVLLM_TRACE_SLOW_FACTOR")
        self._history: dict[str, _PhaseHistory] = {}

    def describe(self) -> str:
        if self.every_step:
            return "every step"
        return (f"first {self.first} steps, prefills, preemptions, errors, eager fallbacks, steps over "
                f"{self.slow_factor:g}x the running median of their phase or among its {SLOWEST_KEPT} slowest "
                f"so far, last {self.last} steps")

    def reason(self, step: StepSummary) -> str | None:
        """Why `step` is detailed, decided as it ends; None: not (yet: it may be among the last)."""
        history = self._history.get(step.phase)
        if history is None:
            history = self._history[step.phase] = _PhaseHistory()
        duration = step.duration_ns
        slowest_so_far = len(history.slowest) >= SLOWEST_KEPT and duration > history.slowest[0]
        slow = len(history.recent) >= 8 and duration > self.slow_factor * history.median
        history.add(duration)
        if step.failed:
            return "error"
        if self.every_step:
            return "debug"
        if step.index - self.first_index < self.first:
            return "first"
        if step.phase in ("prefill", "mixed"):   # a step with prompt tokens: TTFT's and admissions' story
            return "prefill"
        if step.preempted:
            return "preemption"
        if step.eager_fallback:
            return "eager_fallback"
        if slow:
            return "slow"
        if slowest_so_far:
            return "slowest_so_far"
        return None


class StepStretch:
    """A run of consecutive steps that are not detailed, as one aggregate span."""

    def __init__(self):
        self.steps: list[StepSummary] = []

    def add(self, step: StepSummary) -> None:
        self.steps.append(step)

    def __len__(self) -> int:
        return len(self.steps)

    def too_long(self) -> bool:
        return bool(self.steps) and self.steps[-1].end_ns - self.steps[0].start_ns > STRETCH_MAX_NS

    def attrs(self) -> dict:
        steps = self.steps
        durations = [s.duration_ns for s in steps]
        slowest = max(steps, key=lambda s: s.duration_ns)
        phases: dict[str, int] = {}
        for s in steps:
            phases[s.phase] = phases.get(s.phase, 0) + 1
        return {
            S.STEPS_FIRST_INDEX: steps[0].index, S.STEPS_LAST_INDEX: steps[-1].index, S.STEPS_COUNT: len(steps),
            S.STEP_TIME_MEAN_MS: sum(durations) / len(durations) / 1e6, S.STEP_TIME_MAX_MS: max(durations) / 1e6,
            S.SLOWEST_STEP_INDEX: slowest.index, S.NUM_BATCHED_TOKENS: sum(s.num_tokens for s in steps),
            S.STEPS_MEAN_SEQS: sum(s.num_seqs for s in steps) / len(steps),
            S.PHASE: "+".join(sorted(phases)), S.STEPS_PHASE_COUNTS: [f"{p}={n}" for p, n in sorted(phases.items())],
        }
