"""otvllm: a tracing-first LLM inference engine."""

__version__ = "0.1.0"

from otvllm.config import EngineConfig  # noqa: E402
from otvllm.llm import LLM  # noqa: E402
from otvllm.outputs import RequestOutput  # noqa: E402
from otvllm.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "__version__"]
