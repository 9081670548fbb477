"""otvllm: a tracing-first LLM inference engine."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "RequestError", "__version__"]

_EXPORTS = {
    "LLM": "otvllm.llm",
    "SamplingParams": "otvllm.sampling_params",
    "EngineConfig": "otvllm.config",
    "RequestOutput": "otvllm.outputs",
    "RequestError": "otvllm.llm",
}


def __getattr__(name: str):
    # Imported on first use, so that light modules (the trace export process, the CLI's
    # argument parsing) do not pay for torch.
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'otvllm' has no attribute {name!r}")
