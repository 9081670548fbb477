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
    """Pairs of CUDA events around GPU work; durations are read after the host has synchronised."""

    def __init__(self):
        self._pool: list[torch.cuda.Event] = []
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, dict]] = []

    def _event(self) -> torch.cuda.Event:
        return self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)

    def start(self) -> torch.cuda.Event:
        event = self._event()
        event.record()
        return event

    def stop(self, start: torch.cuda.Event, attrs: dict) -> None:
        """Record the end event; `attrs[GPU_TIME_MS]` is filled by `resolve`."""
        end = self._event()
        end.record()
        self._pending.append((start, end, attrs))

    def resolve(self, wait: bool = True) -> None:
        """Fill in the durations of completed pairs; with `wait`, first wait for all of them."""
        still_running = []
        for start, end, attrs in self._pending:
            if not wait and not end.query():
                still_running.append((start, end, attrs))
                continue
            end.synchronize()
            attrs[S.GPU_TIME_MS] = start.elapsed_time(end)
            self._pool += (start, end)
        self._pending = still_running

    def discard(self) -> None:
        self._pending.clear()
