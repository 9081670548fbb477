"""The GPU time of an engine's decode forwards (the model and lm_head, from a CUDA graph where one
is captured; not sampling), from CUDA events recorded around each: latency.py and profile_step.py
read it beside what they time on the host."""

import torch


class DecodeForwardTimer:
    """Records CUDA events around each decode forward of `runner` from now until `remove()`."""

    def __init__(self, runner):
        self.runner, self.forward, self.events = runner, runner.forward, []
        runner.forward = self._timed

    def _timed(self, inputs):
        if inputs.ctx.is_prefill:
            return self.forward(inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.forward(inputs)
        end.record()
        self.events.append((start, end))
        return out

    def take_ms(self) -> list[float]:
        """The GPU time of each decode forward since the last call, in ms (waits for their device work)."""
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in self.events]
        self.events.clear()
        return times

    def remove(self) -> None:
        self.runner.forward = self.forward
