"""What reading GPU telemetry costs the engine thread: one `GpuTelemetry.read()` (the NVML
calls made once per detailed step, as attributes of engine.step), and each of its calls,
next to the CUDA memory snapshot every detailed step already reads. Needs a CUDA device and
nvidia-ml-py.

    python benchmarks/nvml_cost.py [--reads 2000] [--device cuda:0]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otvllm.tracing.recording.cuda import memory_snapshot  # noqa: E402
from otvllm.tracing.recording.nvml import GpuTelemetry  # noqa: E402


def timed_us(fn, n: int) -> tuple[float, float]:
    """Median and 99th percentile of `fn()`'s wall time, in microseconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    times.sort()
    return statistics.median(times), times[min(n - 1, int(0.99 * n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.zeros(1, device=device)   # a CUDA context, as the engine has
    telemetry = GpuTelemetry.open(device)
    if telemetry is None:
        sys.exit("no NVML here: needs a CUDA device and nvidia-ml-py")
    print(f"{torch.cuda.get_device_name(device)}, median and p99 of {args.reads} calls, microseconds")
    print(f"  {'what':<44} {'median':>8} {'p99':>8}")
    rows = [("read() (all figures, once per detailed step)", telemetry.read)]
    rows += [(f"  reader {i}: {', '.join(reader(telemetry._handle))}", lambda r=reader: r(telemetry._handle))
             for i, reader in enumerate(telemetry._readers)]
    rows.append(("memory_snapshot() (already read per detailed step)", lambda: memory_snapshot(device)))
    for label, fn in rows:
        fn()
        median, p99 = timed_us(fn, args.reads)
        print(f"  {label:<44} {median:8.1f} {p99:8.1f}")
    print(f"figures read: {telemetry.read()}")


if __name__ == "__main__":
    main()
