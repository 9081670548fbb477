"""The PyTorch profiler recipe of the debugging guides, inside the trace: the forward of
chosen steps runs under `torch.profiler`, and its CUDA kernels (on CUDA) or top-level aten
operators (on CPU) become child records of `model.forward`, on the span clock.

    OTVLLM_TRACE_PROFILE_STEPS=3,40      steps to profile (indexes as in otvllm.step.index; 10-12 is a range)
    OTVLLM_TRACE_PROFILE_KERNELS=32      kernel spans kept per profiled step: the longest; the rest
                                         are one `kernels.other` record with their count and time

The forward's span also gets the time per kernel name (the summary's top kernels). A
profiled step is perturbed, and says so (`otvllm.step.detail_reason` `profile`): on CUDA the
device is synchronised before its forward (so that only this forward's kernels are in the
profile) and after it (the profiler's stop does), and its engine.step includes the
profiler's start and the conversion of its events; its model.forward does not."""

import json
import os
import re

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from otvllm.tracing import schema as S
from otvllm.environment import read as read_environment
from otvllm.tracing.recording.records import SpanRecord

STEPS_VARIABLE = "OTVLLM_TRACE_PROFILE_STEPS"
KERNELS_VARIABLE = "OTVLLM_TRACE_PROFILE_KERNELS"
TOP_NAMES = 20          # kernel names whose total time is put on the forward span
NAME_CHARS = 120        # a kernel span's name: the kernel's, shortened (the full one is an attribute)
_ANCHOR = "otvllm.profiled_forward"   # marks the forward in the profile: maps its clock to the span clock


def settings_from_env() -> tuple[frozenset[int], int]:
    """(the steps to profile, kernel spans per step); no steps when OTVLLM_TRACE_PROFILE_STEPS
    is unset. ValueError naming the variable for a bad value."""
    return read_environment(STEPS_VARIABLE), read_environment(KERNELS_VARIABLE)


def short_name(name: str) -> str:
    """A kernel's name without its return type and parameter list, at most NAME_CHARS long:
    'void at::native::foo<4>(int, float*)' -> 'at::native::foo<4>'."""
    if name.startswith("void "):
        name = name[5:]
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                if i > 0 and name[i - 1] != " ":   # not 'Memcpy HtoD (Pageable -> Device)'
                    name = name[:i]
                break
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


class StepProfiler:
    """Which steps to profile, and the profiler's settings for this device."""

    def __init__(self, steps: frozenset[int], device: torch.device, max_spans: int):
        self.steps = steps
        self.device = device
        self.max_spans = max_spans
        self.cuda = device.type == "cuda"
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # else Kineto prints two lines per profile

    def warm_up(self) -> None:
        """Kineto's first start takes a second or more: paid at start-up, not in a profiled step."""
        warm = profile(activities=self.activities)
        warm.start()
        warm.stop()

    @classmethod
    def from_env(cls, device: torch.device) -> "StepProfiler | None":
        steps, max_spans = settings_from_env()
        return cls(steps, device, max_spans) if steps else None

    def begin(self, index: int) -> "_Profile | None":
        """A profile of step `index`'s forward if it is one of the chosen steps, started."""
        if index not in self.steps:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        prof = profile(activities=self.activities, record_shapes=not self.cuda)
        prof.start()
        return _Profile(self, prof)


class _Profile:
    def __init__(self, profiler: StepProfiler, prof: profile):
        self.profiler = profiler
        self.prof = prof

    def run(self, fn, *args):
        try:
            with record_function(_ANCHOR):
                return fn(*args)
        except BaseException:
            self.prof.stop()
            raise

    def finish(self, forward: SpanRecord) -> list[SpanRecord]:
        """Stop the profile; the kernel records under `forward` (ended), and the time per
        kernel name on it."""
        self.prof.stop()
        # Kineto's raw events: `prof.events()` would build a Python tree of all of them, a
        # hundred times slower (a second for a large forward).
        events = self.prof.profiler.kineto_results.events()
        anchor = next(e for e in events if e.name() == _ANCHOR and e.device_type() == DeviceType.CPU)
        # The anchor ran inside the forward's record: centre it there (the overheads at either
        # end are a few microseconds).
        offset = (forward.start_ns + forward.end_ns - anchor.start_ns() - anchor.end_ns()) // 2
        cuda = self.profiler.cuda
        ops = _device_kernels(events) if cuda else _top_level_ops(events, anchor)
        spans = [(e.start_ns() + offset, e.end_ns() + offset, e) for e in ops]
        forward.attrs.update(_totals(spans, cuda))
        spans.sort(key=lambda s: s[0] - s[1])   # longest first
        kept, rest = spans[:self.profiler.max_spans], spans[self.profiler.max_spans:]
        records = [SpanRecord(short_name(e.name()), forward, start, end, _kernel_attrs(e, cuda))
                   for start, end, e in sorted(kept, key=lambda s: s[0])]
        if rest:
            records.append(SpanRecord(S.KERNELS_OTHER, forward, min(s[0] for s in rest), max(s[1] for s in rest), {
                S.KERNEL_DEVICE: "cuda" if cuda else "cpu", S.KERNEL_COUNT: len(rest),
                S.KERNEL_TIME_MS: sum(end - start for start, end, _ in rest) / 1e6}))
        return records


def _device_kernels(events) -> list:
    """Everything the device ran (kernels, copies, fills), without the profiler's own ranges."""
    return [e for e in events if e.device_type() == DeviceType.CUDA and not e.is_user_annotation()
            and e.name() != _ANCHOR]


def _top_level_ops(events, anchor) -> list:
    """The operators the forward called directly (not those they called): they do not
    overlap, and add up to the forward's time."""
    thread, start, end = anchor.start_thread_id(), anchor.start_ns(), anchor.end_ns()
    inside = sorted((e for e in events if e.device_type() == DeviceType.CPU and e.start_thread_id() == thread
                     and start <= e.start_ns() and e.end_ns() <= end and e is not anchor and e.name() != _ANCHOR),
                    key=lambda e: (e.start_ns(), -e.duration_ns()))
    ops, covered = [], start
    for e in inside:
        if e.start_ns() >= covered:
            ops.append(e)
            covered = e.end_ns()
    return ops


def _totals(spans: list, cuda: bool) -> dict:
    """The forward's profile in a few attributes: kernels, their time, the top names by time."""
    by_name: dict[str, list] = {}
    for start, end, e in spans:
        entry = by_name.setdefault(short_name(e.name()), [0, 0])
        entry[0] += end - start
        entry[1] += 1
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_NAMES]
    return {
        S.PROFILE_DEVICE: "cuda" if cuda else "cpu", S.PROFILE_KERNELS: len(spans),
        S.PROFILE_TIME_MS: sum(end - start for start, end, _ in spans) / 1e6,
        S.PROFILE_TOP_NAMES: [name for name, _ in top],
        S.PROFILE_TOP_TIME_MS: [ns / 1e6 for _, (ns, _) in top],
        S.PROFILE_TOP_CALLS: [calls for _, (_, calls) in top],
    }


def _kernel_attrs(event, cuda: bool) -> dict:
    attrs = {S.KERNEL_NAME: event.name(), S.KERNEL_DEVICE: "cuda" if cuda else "cpu"}
    if cuda:
        text = event.metadata_json() or ""
        for key, attr in (("grid", S.KERNEL_GRID), ("block", S.KERNEL_BLOCK)):
            dims = _launch_dims(text, key)
            if dims:
                attrs[attr] = dims
    elif event.shapes():
        attrs[S.KERNEL_INPUT_SHAPES] = json.dumps(event.shapes())
    return attrs


def _launch_dims(metadata: str, key: str) -> list[int] | None:
    """A kernel's "grid" or "block" ([x, y, z]) from Kineto's metadata of a device event (which
    torch 2.11 leaves empty: then None)."""
    match = re.search(rf'"{key}"\s*:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]', metadata)
    return [int(x) for x in match.groups()] if match else None
