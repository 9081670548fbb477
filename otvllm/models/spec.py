"""What otvllm needs from a Hugging Face config.json, checked and normalised."""

import json
import os
from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")


@dataclass
class ModelSpec:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    inv_freq: torch.Tensor
    rope_scaling: float
    sliding_window: int | None
    torch_dtype: torch.dtype | None
    eos_token_ids: tuple[int, ...]

    def summary(self) -> dict:
        return {"architecture": self.architecture, "layers": self.num_layers, "hidden_size": self.hidden_size,
                "heads": self.num_heads, "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size}


def read_config(model_dir: str):
    """The transformers config of a model directory, with clear errors for what is missing."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json: expected a Hugging Face format model directory")
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, it holds a {type(raw).__name__}")
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [str(architectures)]
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported architecture {', '.join(architectures) or '(none in config.json)'} "
                         f"in {model_dir!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    _check_fields(path, raw)
    from transformers import AutoConfig
    try:
        return arch, AutoConfig.from_pretrained(model_dir)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path} could not be read as a {arch} config: {e}") from None


_POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _check_fields(path: str, raw: dict) -> None:
    """The sizes the engine builds from: positive integers, and heads that group evenly."""
    for name in _POSITIVE_INTS:
        value = raw.get(name)
        if value is None and name in ("num_key_value_heads", "head_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {name} must be a positive integer, got {value!r}")
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv_heads:
        raise ValueError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{path}: rms_norm_eps must be a positive number, got {eps!r}")


def _rope_parameters(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    return scaling


def _inv_freq(cfg, head_dim: int) -> tuple[torch.Tensor, float]:
    params = _rope_parameters(cfg)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))


def _eos_ids(cfg) -> tuple[int, ...]:
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def model_spec(arch: str, cfg) -> ModelSpec:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq, scaling = _inv_freq(cfg, head_dim)
    sliding = getattr(cfg, "sliding_window", None)
    if arch == "Qwen2ForCausalLM" and not getattr(cfg, "use_sliding_window", False):
        sliding = None
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return ModelSpec(
        architecture=arch,
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(cfg, "attention_bias", False)),
        o_bias=arch != "Qwen2ForCausalLM" and bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        inv_freq=inv_freq,
        rope_scaling=float(scaling),
        sliding_window=sliding,
        torch_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        eos_token_ids=_eos_ids(cfg),
    )
