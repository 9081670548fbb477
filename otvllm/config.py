"""The engine's settings as the user gives them, checked when made and never changed afterwards.

What start-up decides from them (the model's length limit, the KV blocks, the dtype, the
attention backend, ...) is a `ResolvedConfig` (core/resolved_config.py). Each field carries its
help (and choices, and CLI flag where it is not the field's name) in its metadata: the CLI
builds its engine options from them. No torch at import: the CLI's argument parsing reads this.
"""

import math
import typing
from dataclasses import Field, dataclass, field, fields

from otvllm.environment import read as read_environment
from otvllm.ops import ATTENTION_BACKENDS
from otvllm.tracing.level import NAMES as TRACE_LEVELS
from otvllm.tracing.level import TraceLevel

DEFAULT_MAX_MODEL_LEN = 4096
DTYPES = ("float32", "float16", "bfloat16")
AUTO = "auto"


def _option(default, help: str, choices: tuple[str, ...] | None = None, flag: str | None = None,
            minimum: int = 1):
    """`minimum`: an int option's least value."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "minimum": minimum})


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. `LLM(model, **kwargs)` takes every field as a keyword."""

    model: str
    max_num_seqs: int = _option(256, "sequences in one batch")
    max_num_batched_tokens: int = _option(
        16384, "tokens one step may compute (at least max_num_seqs; longer prompts are prefilled in chunks)")
    max_model_len: int | None = _option(
        None, f"longest prompt plus output (default: the model's limit, at most {DEFAULT_MAX_MODEL_LEN})")
    kvcache_block_size: int = _option(256, "KV-cache block (page) size in tokens", flag="--block-size")
    num_kvcache_blocks: int | None = _option(
        None, "KV-cache blocks (default: what gpu_memory_utilization leaves room for on CUDA; on CPU, "
              "max_num_seqs sequences of max_model_len within a fixed memory budget)")
    gpu_memory_utilization: float = _option(0.9, "share of the GPU's memory the engine may use")
    enforce_eager: bool = _option(False, "no CUDA graphs")
    torch_compile: bool | None = _option(
        None, "fuse the small layers and the sampler with torch.compile (default: on CUDA, not on CPU)")
    tensor_parallel_size: int = _option(
        1, "ranks (GPUs, or CPU processes) the model is split over, Megatron-style: one worker process per rank "
           "after the first; the attention heads, KV heads and intermediate size must divide by it")
    device: str | None = _option(None, "cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    dtype: str | None = _option(
        None, "the weights' and activations' dtype (default: the checkpoint's float16 or bfloat16 on CUDA, "
              "else bfloat16; float32 on CPU)",
        choices=DTYPES)
    attention_backend: str = _option(
        AUTO, "attention kernels (auto: flash_attn where it can serve the model, else triton on CUDA, "
              "else torch)", choices=(AUTO, *ATTENTION_BACKENDS))
    trace_level: str | None = _option(None, "trace detail (default: OTVLLM_TRACE_LEVEL, else step)",
                                         choices=TRACE_LEVELS)
    cudagraph_max_batch_size: int = _option(512, "largest decode batch replayed from a CUDA graph")
    cudagraph_max_prefill_tokens: int = _option(
        8192, "largest prefill or mixed step, in tokens, replayed from a CUDA graph (Triton attention only; "
              "0: prefill eagerly)", minimum=0)
    max_logprobs: int = _option(20, "the most top log-probabilities a request may ask for")
    cpu_threads: int | None = _option(
        None, "on CPU, torch's threads (default: OMP_NUM_THREADS, else one fewer than the usable cores, "
              "at most 8)")

    def requested_trace_level(self) -> TraceLevel:
        return requested_trace_level(self.trace_level)

    def __post_init__(self):
        self.requested_trace_level()
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence decodes in each step, before any prompt chunk: the budget must
            # hold them all, or a step would compute more tokens than start-up planned memory for.
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                             f"{self.max_num_seqs}: a step decodes one token of every running sequence; raise "
                             f"max_num_batched_tokens or lower max_num_seqs")
        if self.device is not None:
            if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
                raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
            import torch   # here, not at the top: see the module's docstring
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError("device='cuda' was asked for but torch sees no CUDA device")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in option_fields()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(model=model, **kwargs)


def requested_trace_level(trace_level: str | None) -> TraceLevel:
    """A trace_level setting, or OTVLLM_TRACE_LEVEL when it is None; ValueError naming what is wrong."""
    return TraceLevel.parse(read_environment("OTVLLM_TRACE_LEVEL") if trace_level is None else trace_level)


def option_fields() -> list[Field]:
    """The engine options: every field but the model."""
    return [f for f in fields(EngineConfig) if f.name != "model"]


def field_kind(f: Field) -> tuple[type, bool]:
    """(int, float, bool or str; whether None is allowed) from the field's annotation."""
    args = typing.get_args(f.type)
    if not args:
        return f.type, False
    return next(a for a in args if a is not type(None)), type(None) in args


def _check_field(f: Field, value) -> None:
    kind, optional = field_kind(f)
    if value is None and optional:
        return
    name = f.name
    minimum = f.metadata.get("minimum", 1)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
