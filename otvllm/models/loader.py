"""Build a model from a Hugging Face directory and fill it from its safetensors files."""

import glob
import os

import torch
from safetensors import SafetensorError, safe_open

from otvllm.layers.basic import MergedLinear
from otvllm.layers.parallel import SINGLE, TensorParallel, split_dim
from otvllm.models.decoder import DecoderForCausalLM
from otvllm.models.spec import ModelSpec


def checkpoint_names(model: DecoderForCausalLM) -> set[str]:
    """The checkpoint entries the model needs, in the checkpoint's own names (q_proj, not qkv_proj)."""
    names, seen = set(), set()
    for module_path, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, MergedLinear):
                parent = module_path.rpartition(".")[0]
                names.update(f"{parent}.{shard}.{param_name}" for shard in module.offsets)
            else:
                names.add(f"{module_path}.{param_name}")
    return names   # a tied lm_head shares embed_tokens' parameter and is listed once


def _target(model: DecoderForCausalLM, name: str) -> torch.Tensor | None:
    """The tensor a checkpoint entry goes into, or None for entries the engine does not use."""
    module_path, _, param_name = name.rpartition(".")
    parent_path, _, leaf = module_path.rpartition(".")
    merged = model.packed_modules.get(leaf)
    if merged is not None:
        return model.get_submodule(f"{parent_path}.{merged}").shard(param_name, leaf)
    try:
        return model.get_parameter(name).data
    except AttributeError:
        return None


def load_weights(model: DecoderForCausalLM, model_dir: str) -> None:
    """Copy every checkpoint tensor into `model`. Raises ValueError naming what is missing or mismatched."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_dir!r} has no *.safetensors weight files")
    filled: set[str] = set()
    for path in files:
        try:
            _load_file(model, path, filled)
        except (SafetensorError, OSError) as e:   # a truncated or corrupt file
            raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    missing = sorted(checkpoint_names(model) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{model_dir!r} lacks {len(missing)} weight(s) the model needs: {shown}")


def _split(model: DecoderForCausalLM, name: str) -> tuple[int, bool] | None:
    """(the dimension of checkpoint entry `name` split over the ranks, whether its last slice may
    be short), or None: each rank reads it whole."""
    module_path, _, param_name = name.rpartition(".")
    if module_path.rpartition(".")[2] in model.packed_modules:
        return 0, False   # column-parallel: each of q/k/v (gate/up) split along its rows
    return split_dim(model.get_submodule(module_path), param_name)


def _read_rank_slice(f, name: str, target: torch.Tensor, split: tuple[int, bool], tp: TensorParallel,
                     path: str) -> None:
    """Copy this rank's slice of entry `name` into `target`, reading that slice only. A slice
    that may be short (the vocabulary's last) leaves the target's rows past it as padding."""
    dim, may_pad = split
    part = f.get_slice(name)
    shape = list(part.get_shape())
    per_rank = target.shape[dim]
    whole = list(target.shape)
    whole[dim] = per_rank * tp.size
    if may_pad and len(shape) == len(whole) and -(-shape[dim] // tp.size) == per_rank:
        whole[dim] = shape[dim]
    if shape != whole:
        raise ValueError(f"weight {name} has shape {shape} in {os.path.basename(path)}, the model expects "
                         f"{whole}: config.json does not match the weights")
    start = tp.rank * per_rank
    end = min(start + per_rank, shape[dim])
    if end > start:
        index = (slice(start, end),) if dim == 0 else (slice(None), slice(start, end))
        target.narrow(dim, 0, end - start).copy_(part[index])


def _load_file(model: DecoderForCausalLM, path: str, filled: set[str]) -> None:
    tp = model.tp
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            if model.spec.tie_word_embeddings and name == "lm_head.weight":
                continue
            target = _target(model, name)
            if target is None:
                continue
            split = _split(model, name) if tp.size > 1 else None
            if split is not None:
                _read_rank_slice(f, name, target, split, tp, path)
                filled.add(name)
                continue
            tensor = f.get_tensor(name)
            if tensor.shape != target.shape:
                raise ValueError(f"weight {name} has shape {list(tensor.shape)} in {os.path.basename(path)}, "
                                 f"the model expects {list(target.shape)}: config.json does not match the weights")
            target.copy_(tensor)
            filled.add(name)


def build_model(spec: ModelSpec, model_dir: str, dtype: torch.dtype, device: torch.device,
                max_positions: int, tp: TensorParallel = SINGLE) -> DecoderForCausalLM:
    """The model on `device` in `dtype` with its weights loaded (rotary tables for
    `max_positions` positions); with tensor parallelism, rank `tp.rank`'s part of it."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DecoderForCausalLM(spec, max_positions, tp)
    finally:
        torch.set_default_dtype(default_dtype)
    load_weights(model, model_dir)
    return model.eval().requires_grad_(False)
