"""What start-up decides from the user's EngineConfig and the model: one frozen object that the
engine and the model runner read and `engine.init` reports (as `otvllm.config.*`)."""

import os
from dataclasses import dataclass, fields

import torch

from otvllm.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from otvllm.models.spec import ModelSpec
from otvllm.ops.backend import choose_backend
from otvllm.tracing.level import TraceLevel


@dataclass(frozen=True)
class ResolvedConfig:
    model: str
    device: str                        # cpu, cuda or cuda:N
    trace_level: str
    dtype: str                         # float32, float16 or bfloat16
    attention_backend: str             # torch, triton or flash_attn
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kvcache_block_size: int
    num_kvcache_blocks: int | None     # None until the KV cache is sized, after the model has loaded
    gpu_memory_utilization: float
    enforce_eager: bool                # also at trace level debug: per-layer spans need the eager forward
    cuda_graphs: bool                  # decode steps (and prefills up to cudagraph_max_prefill_tokens) replay CUDA graphs
    torch_compile: bool                # the small layers and the sampler are fused by torch.compile
    tensor_parallel_size: int
    cudagraph_max_batch_size: int
    cudagraph_max_prefill_tokens: int  # 0 where prefills run eagerly
    max_logprobs: int
    cpu_threads: int | None            # the CPU device's torch threads (None on CUDA)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def resolve_device(config: EngineConfig) -> str:
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_config(config: EngineConfig, spec: ModelSpec, level: TraceLevel, device: str) -> ResolvedConfig:
    """Everything but the number of KV blocks (sized once the weights are in memory); raises
    ValueError naming the setting that cannot be met. `level` and `device` are decided first:
    the tracer needs them before the model's config is read."""
    max_model_len = _max_model_len(config, spec)
    on_cuda = torch.device(device).type == "cuda"
    check_tensor_parallel(config, spec, device)
    dtype = _dtype(config, spec, on_cuda)
    backend = choose_backend(config.attention_backend, torch.device(device), getattr(torch, dtype), spec.head_dim)
    enforce_eager = config.enforce_eager or level is TraceLevel.DEBUG
    # The torch reference syncs with the host (.tolist()), which a graph cannot capture.
    cuda_graphs = on_cuda and not enforce_eager and backend != "torch"
    decided = dict(
        device=device,
        trace_level=str(level),
        dtype=dtype,
        attention_backend=backend,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        cuda_graphs=cuda_graphs,
        # FlashAttention-4's prefill launch depends on the longest prompt: only Triton's is captured.
        cudagraph_max_prefill_tokens=(min(config.cudagraph_max_prefill_tokens, config.max_num_batched_tokens)
                                      if cuda_graphs and backend == "triton" else 0),
        torch_compile=on_cuda if config.torch_compile is None else config.torch_compile,
        cpu_threads=None if on_cuda else _cpu_threads(config),
    )
    as_given = {f.name: getattr(config, f.name) for f in fields(ResolvedConfig) if f.name not in decided}
    return ResolvedConfig(**as_given, **decided)


def _dtype(config: EngineConfig, spec: ModelSpec, on_cuda: bool) -> str:
    if config.dtype is not None:
        return config.dtype
    if not on_cuda:
        return "float32"
    if spec.torch_dtype in (torch.float16, torch.bfloat16):
        return str(spec.torch_dtype).removeprefix("torch.")
    return "bfloat16"


def _max_model_len(config: EngineConfig, spec: ModelSpec) -> int:
    """None: the model's limit, at most DEFAULT_MAX_MODEL_LEN; a value past the model's limit
    is refused (the positions were never trained, or the window would be exceeded)."""
    limits = {"max_position_embeddings": spec.max_position_embeddings}
    if spec.sliding_window:   # within the window, full attention is sliding attention
        limits["sliding_window"] = spec.sliding_window
    name, limit = min(limits.items(), key=lambda item: item[1])
    max_model_len = config.max_model_len
    if max_model_len is None:
        max_model_len = min(DEFAULT_MAX_MODEL_LEN, limit)
    elif max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} is more than the model allows ({name}={limit} "
                         f"in {config.model}/config.json): lower max_model_len")
    return max_model_len


def check_tensor_parallel(config: EngineConfig, spec: ModelSpec, device: str) -> None:
    """The split must be even, and on CUDA each rank needs its own GPU (rank r on the device's
    index + r). The vocabulary need not divide: its last slice is padded."""
    n = config.tensor_parallel_size
    if n == 1:
        return
    sizes = {"num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
             "intermediate_size": spec.intermediate_size}
    for name, size in sizes.items():
        if size % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide {name}={size} of {config.model}: "
                             f"each rank needs an equal share; choose a divisor of {size}")
    where = torch.device(device)
    if where.type == "cuda":
        first, visible = where.index or 0, torch.cuda.device_count()
        if first + n > visible:
            raise ValueError(f"tensor_parallel_size={n} needs GPUs {first}..{first + n - 1}, but torch sees "
                             f"{visible} GPU(s): lower tensor_parallel_size (or set CUDA_VISIBLE_DEVICES)")


def _cpu_threads(config: EngineConfig) -> int:
    """`cpu_threads`, else OMP_NUM_THREADS, else one fewer than the usable cores (one is left
    for the export process and the OS), at most 8."""
    if config.cpu_threads is not None:
        return config.cpu_threads
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))
