"""Programmatic dependent launch (PDL, compute capability 9.0 and up) for the Triton kernels of
a decode step.

A decode step of few sequences is some 200 kernels of a few microseconds, and each pays a launch
and a ramp while the GPU idles between kernels. Launched with PDL, a kernel may start while the
one before it in the stream is finishing. It first does what needs nothing from that kernel (the
GEMV asks for its weights to be brought into L2), then waits (`griddepcontrol.wait` returns once
the kernel before has completed and its writes are visible), then lets the next kernel launch.

The rule for a kernel launched with PDL: before its wait it writes nothing and reads only what
the kernel before it does not write. Everything older has completed by then: the kernel before
let it launch only after its own wait. A kernel launched without PDL (cuBLAS, torch) waits for
the whole kernel before it, as always. In a CUDA graph the launches become programmatic edges.

On the H200 this took the batch-1 time per output token of Qwen3-0.6B at a 1,024-token context
from 0.975 to 0.88-0.90 ms in six runs of nine, and batch 8 from 1.51 to 1.47 ms (benchmarks/latency.py;
the README has the runs).
"""

import functools

import torch
import triton
import triton.language as tl

from otvllm.ops.triton_interpreter import interpreting


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA devices of compute capability 9.0 and up,
    not under the Triton interpreter."""
    if interpreting(device):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Waits for the kernel before (with PDL; a no-op without), then lets the next one launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Asks for the 128-byte lines holding `ptrs` to be brought into L2, without waiting for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
