"""CUDA memory figures and GPU durations for spans, read cheaply: one allocator stats call
per traced step, CUDA events resolved once they have completed."""

import torch

from otvllm.tracing import schema as S


def memory_snapshot(device: torch.device) -> dict:
    """Allocated, reserved and peak bytes from one allocator stats call, plus the driver's
    free/total. Empty on CPU."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        S.MEM_ALLOCATED: stats.get("allocated_bytes.all.current", 0),
        S.MEM_RESERVED: stats.get("reserved_bytes.all.current", 0),
        S.MEM_PEAK: stats.get("allocated_bytes.all.peak", 0),
        S.MEM_FREE: free,
        S.MEM_TOTAL: total,
    }


class GpuTimer:
    """Pairs of CUDA events around GPU work, recycled; a pair's duration is read once its end
    event has completed, never by waiting for it on the engine's behalf."""

    def __init__(self):
        self._pool: list[torch.cuda.Event] = []

    def _event(self) -> torch.cuda.Event:
        return self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)

    def start(self) -> torch.cuda.Event:
        event = self._event()
        event.record()
        return event

    def stop(self, start: torch.cuda.Event) -> tuple:
        end = self._event()
        end.record()
        return start, end

    @staticmethod
    def done(pair: tuple) -> bool:
        return pair[1].query()

    def elapsed_ms(self, pair: tuple) -> float:
        """The pair's duration (waits if it has not completed), and the pair back to the pool."""
        start, end = pair
        end.synchronize()
        ms = start.elapsed_time(end)
        self._pool += (start, end)
        return ms

    def release(self, pair: tuple) -> None:
        self._pool += pair
