import os
from dataclasses import dataclass, field, fields

import torch

from otvllm.environment import read as read_environment
from otvllm.tracing.level import TraceLevel

DEFAULT_MAX_MODEL_LEN = 4096
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    """Engine settings. `LLM(model, **kwargs)` takes every field as a keyword."""

    model: str
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    max_model_len: int | None = None       # None: the model's limit, at most DEFAULT_MAX_MODEL_LEN
    kvcache_block_size: int = 256
    num_kvcache_blocks: int | None = None  # None: sized from gpu_memory_utilization (CUDA) or max_num_seqs (CPU)
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    device: str | None = None              # None: cuda when available, else cpu
    dtype: str | None = None               # None: the checkpoint's dtype on CUDA, float32 on CPU
    attention_backend: str = "auto"        # auto | torch | triton | flash_attn
    trace_level: str | None = None         # None: OTVLLM_TRACE_LEVEL, else "step"
    cudagraph_max_batch_size: int = 512
    max_logprobs: int = 20                 # the most top log-probabilities a request may ask for
    cpu_threads: int | None = None         # CPU device: torch threads; None: OMP_NUM_THREADS, else cores - 1
    seed: int = 0
    hf_config: object = field(default=None, repr=False)

    def __post_init__(self):
        level = read_environment("OTVLLM_TRACE_LEVEL") if self.trace_level is None else self.trace_level
        self.trace_level = str(TraceLevel.parse(level))
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kvcache_block_size",
                     "num_kvcache_blocks", "tensor_parallel_size", "cudagraph_max_batch_size", "max_logprobs",
                     "cpu_threads"):
            value = getattr(self, name)
            optional = name in ("max_model_len", "num_kvcache_blocks", "cpu_threads")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        for name in ("device", "dtype", "attention_backend"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float)):
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {self.gpu_memory_utilization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet: use 1")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton", "flash_attn"):
            raise ValueError(f"attention_backend must be auto, torch, triton or flash_attn, "
                             f"got {self.attention_backend!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)} - {"model", "hf_config"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(model=model, **kwargs)

    def resolve_cpu_threads(self) -> int:
        """Threads for the CPU device: `cpu_threads`, else OMP_NUM_THREADS, else one fewer than
        the usable cores (one is left for the export process and the OS), at most 8."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        value = os.environ.get("OMP_NUM_THREADS", "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cores - 1))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)
