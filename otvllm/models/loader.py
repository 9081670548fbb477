"""Build a model from a Hugging Face directory and fill it from its safetensors files."""

import glob
import os

import torch
from safetensors import safe_open

from otvllm.models.decoder import DecoderForCausalLM
from otvllm.models.spec import ModelSpec


def _target(model: DecoderForCausalLM, name: str) -> torch.Tensor | None:
    """The tensor a checkpoint entry goes into, or None for entries the engine does not use."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    module_path, _, param_name = name.rpartition(".")
    parent_path, _, leaf = module_path.rpartition(".")
    merged = model.packed_modules.get(leaf)
    if merged is not None:
        module = model.get_submodule(f"{parent_path}.{merged}")
        return module.shard(param_name, leaf)
    try:
        return model.get_parameter(name).data
    except AttributeError:
        return None


def load_weights(model: DecoderForCausalLM, model_dir: str) -> int:
    """Copy every checkpoint tensor into `model`; returns the bytes read. Raises if any weight is missing."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_dir!r} has no *.safetensors weight files")
    expected = {name for name, _ in model.named_parameters()}
    filled: set[str] = set()
    nbytes = 0
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if model.spec.tie_word_embeddings and name == "lm_head.weight":
                    continue
                target = _target(model, name)
                if target is None:
                    continue
                tensor = f.get_tensor(name)
                if tensor.shape != target.shape:
                    raise ValueError(f"weight {name} has shape {list(tensor.shape)} in {os.path.basename(path)}, "
                                     f"the model expects {list(target.shape)}: config.json does not match the weights")
                target.copy_(tensor)
                nbytes += tensor.numel() * tensor.element_size()
                filled.add(_param_name(model, name))
    missing = sorted(expected - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{model_dir!r} lacks {len(missing)} weight(s) the model needs: {shown}")
    return nbytes


def _param_name(model: DecoderForCausalLM, name: str) -> str:
    module_path, _, param_name = name.rpartition(".")
    parent_path, _, leaf = module_path.rpartition(".")
    merged = model.packed_modules.get(leaf)
    return f"{parent_path}.{merged}.{param_name}" if merged else name


def build_model(spec: ModelSpec, model_dir: str, dtype: torch.dtype, device: torch.device,
                max_positions: int) -> tuple[DecoderForCausalLM, int]:
    """The model on `device` in `dtype` with its weights loaded (rotary tables for
    `max_positions` positions), and the checkpoint bytes read."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DecoderForCausalLM(spec, max_positions)
    finally:
        torch.set_default_dtype(default_dtype)
    nbytes = load_weights(model, model_dir)
    return model.eval().requires_grad_(False), nbytes
