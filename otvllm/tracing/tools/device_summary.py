"""The summary's lines about the device, from detailed steps: the kernels (CUDA) or
operators (CPU) of profiled steps with the most time, and the GPU telemetry (NVML)."""

import json

from otvllm.tracing import schema as S

TOP_KERNELS = 10
TELEMETRY = (   # attribute, label, unit
    (S.GPU_UTILIZATION, "utilisation", "%"), (S.GPU_MEMORY_UTILIZATION, "memory utilisation", "%"),
    (S.GPU_SM_CLOCK, "SM clock", " MHz"), (S.GPU_MEMORY_CLOCK, "memory clock", " MHz"),
    (S.GPU_POWER, "power", " W"), (S.GPU_TEMPERATURE, "temperature", " C"),
)


def _array(value) -> list:
    """An array attribute: a list in memory, a JSON string in a Jaeger file."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return list(value) if isinstance(value, (list, tuple)) else []


def device_lines(steps) -> list[str]:
    """`steps`: the detailed engine.step spans (objects with `attrs` and `descendants()`)."""
    forwards = [d.attrs for step in steps for d in step.descendants() if d.name == S.FORWARD]
    return kernel_lines(forwards) + telemetry_lines([step.attrs for step in steps])


def kernel_lines(forwards: list[dict]) -> list[str]:
    profiled = [a for a in forwards if S.PROFILE_TOP_NAMES in a]
    if not profiled:
        return []
    totals: dict[str, list] = {}
    for a in profiled:
        for name, ms, calls in zip(_array(a[S.PROFILE_TOP_NAMES]), _array(a.get(S.PROFILE_TOP_TIME_MS)),
                                   _array(a.get(S.PROFILE_TOP_CALLS))):
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += ms
            entry[1] += calls
    all_ms = sum(a.get(S.PROFILE_TIME_MS, 0.0) for a in profiled)
    count = sum(a.get(S.PROFILE_KERNELS, 0) for a in profiled)
    what = "CUDA kernels" if any(a.get(S.PROFILE_DEVICE) == "cuda" for a in profiled) else "CPU operators"
    lines = [f"  top {what} by time, over {len(profiled)} profiled step{'s' * (len(profiled) != 1)} "
             f"({count:,} {what.split()[1]}, {all_ms:.3f} ms):"]
    for name, (ms, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]:
        share = 100 * ms / all_ms if all_ms else 0.0
        label = name if len(name) <= 60 else name[:59] + "…"
        lines.append(f"    {label:<60} {ms:10.3f} ms {share:5.1f}%  {calls:>6,} calls")
    return lines


def telemetry_lines(steps: list[dict]) -> list[str]:
    parts = []
    for key, label, unit in TELEMETRY:
        values = [a[key] for a in steps if a.get(key) is not None]
        if values:
            parts.append(f"{label} {sum(values) / len(values):.0f}{unit} mean, {max(values):.0f}{unit} max")
    if not parts:
        return []
    n = sum(1 for a in steps if any(a.get(key) is not None for key, _, _ in TELEMETRY))
    return [f"  GPU (NVML, {n} detailed steps): " + "; ".join(parts)]
