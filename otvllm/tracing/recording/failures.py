"""What the span of a failed phase says: what its attribute function can tell without a
result (the shapes it was given), the device's memory when it failed, and advice where the
fix is known."""

import torch

from otvllm.tracing import schema as S
from otvllm.tracing.recording.cuda import memory_snapshot

OOM_ADVICE = ("CUDA ran out of memory: lower gpu_memory_utilization (leaves more for activations), "
              "max_num_seqs or max_num_batched_tokens (smaller batches), or max_model_len")
CUDA_ERROR_ADVICE = ("CUDA reports a failed kernel at a later call, so the kernel at fault may have run before "
                     "this span: rerun with CUDA_LAUNCH_BLOCKING=1 and trace level debug (one span per layer, the "
                     "device synchronised after each) to name it; the device is unusable until the process restarts")


def error_advice(exc: BaseException) -> str | None:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OOM_ADVICE
    if isinstance(exc, getattr(torch, "AcceleratorError", ())) or \
            (isinstance(exc, RuntimeError) and "CUDA error" in str(exc)):
        return CUDA_ERROR_ADVICE
    return None


def describe_failure(record, exc: BaseException, attrs, args, device: torch.device, phase: str | None = None) -> None:
    """Fill in the span of a phase that raised `exc`. `attrs(None, *args)`: the phase's attribute
    function, told there is no result. Never raises: the phase's own error is the one to report."""
    if attrs is not None:
        try:
            record.attrs.update(attrs(None, *args))
        except Exception:
            pass
    if phase is not None:
        record.attrs.setdefault(S.PHASE, phase)
    try:
        record.attrs.update(memory_snapshot(device))
    except Exception:   # a device that failed may not answer
        pass
    failed_rank = getattr(exc, "failed_rank", None)   # tensor parallelism's RankFailed
    if failed_rank is not None:
        record.attrs[S.TP_FAILED_RANK] = failed_rank
    advice = error_advice(exc)
    if advice is not None:
        record.attrs[S.ERROR_ADVICE] = advice
