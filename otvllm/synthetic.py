"""The built-in synthetic model: a tiny Qwen3 with seeded random weights and a byte-level
tokenizer, written once into the user's cache so that otvllm runs with nothing downloaded.
Its output is noise; it exists to exercise (and trace) the engine."""

import os
import shutil
import tempfile

SYNTHETIC_NAME = "synthetic-qwen3-v1"
SYNTHETIC_MODEL = "synthetic"   # what `LLM()`, `LLM("synthetic")` and the CLI's default model mean
EOS_TOKEN = "<|endoftext|>"


def cache_dir() -> str:
    from otvllm.environment import read
    return read("OTVLLM_CACHE_DIR")


def byte_level_tokenizer():
    """A transformers tokenizer with one token per byte (ids 0-255) and an EOS token (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def write_model(path: str, architecture: str = "Qwen3ForCausalLM", seed: int = 0, tokenizer: bool = True,
                max_shard_size: str | None = None, **overrides) -> str:
    """Save a small randomly initialised model of `architecture` with transformers (safetensors)."""
    import torch
    import transformers

    config_cls = {
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
    }[architecture]
    settings = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                    tie_word_embeddings=True, eos_token_id=256, bos_token_id=None, pad_token_id=None,
                    rms_norm_eps=1e-6, initializer_range=0.25)
    settings.update(overrides)
    config = config_cls(**settings)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(torch.float32)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer:
        byte_level_tokenizer().save_pretrained(path)
    return path


def synthetic_model_dir() -> str:
    """The synthetic model's directory, created on first use (safe against concurrent creators)."""
    target = os.path.join(cache_dir(), SYNTHETIC_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=SYNTHETIC_NAME + ".", dir=cache_dir())
    try:
        write_model(staging, "Qwen3ForCausalLM", seed=0, vocab_size=384, hidden_size=256,
                    intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=32, max_position_embeddings=4096)
        os.replace(staging, target)
    except OSError:
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str) -> str:
    """A model directory: `model` itself, or the synthetic model's for the name "synthetic"
    (unless a directory of that name exists here)."""
    if model == SYNTHETIC_MODEL and not os.path.isdir(model):
        return synthetic_model_dir()
    return model
