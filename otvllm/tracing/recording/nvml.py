"""GPU telemetry through NVML (what `nvidia-smi dmon` shows): utilisation, SM and memory
clocks, power and temperature, read once per detailed step as attributes of `engine.step`.

`nvidia-ml-py` (the `pynvml` module) is imported only on CUDA. Without it, or where the
driver does not answer, steps carry no telemetry; a figure the device does not support is
left out (and not asked for again)."""

import warnings

import torch

from otvllm.tracing import schema as S


class GpuTelemetry:
    def __init__(self, nvml, handle):
        self._nvml = nvml
        self._handle = handle
        sm, mem, gpu_sensor = nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU
        # Each reader is one NVML call and gives one or two attributes.
        self._readers = [
            lambda h: _utilization(nvml.nvmlDeviceGetUtilizationRates(h)),
            lambda h: {S.GPU_SM_CLOCK: nvml.nvmlDeviceGetClockInfo(h, sm)},
            lambda h: {S.GPU_MEMORY_CLOCK: nvml.nvmlDeviceGetClockInfo(h, mem)},
            lambda h: {S.GPU_POWER: nvml.nvmlDeviceGetPowerUsage(h) / 1000},   # milliwatts
            lambda h: {S.GPU_TEMPERATURE: nvml.nvmlDeviceGetTemperature(h, gpu_sensor)},
        ]

    @classmethod
    def open(cls, device: torch.device) -> "GpuTelemetry | None":
        try:
            import pynvml
        except ImportError:
            warnings.warn("no GPU telemetry in the trace: nvidia-ml-py is not installed (pip install nvidia-ml-py)",
                          stacklevel=2)
            return None
        try:
            pynvml.nvmlInit()
            # By UUID: CUDA_VISIBLE_DEVICES may number the devices differently from NVML.
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid)
        except pynvml.NVMLError as e:
            warnings.warn(f"no GPU telemetry in the trace: NVML did not answer ({e})", stacklevel=2)
            return None
        return cls(pynvml, handle)

    def read(self) -> dict:
        attrs = {}
        for reader in list(self._readers):
            try:
                attrs.update(reader(self._handle))
            except self._nvml.NVMLError_NotSupported:
                self._readers.remove(reader)
            except self._nvml.NVMLError:
                pass
        return attrs


def _utilization(rates) -> dict:
    return {S.GPU_UTILIZATION: rates.gpu, S.GPU_MEMORY_UTILIZATION: rates.memory}
