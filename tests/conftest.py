import os

import pytest

from otvllm.synthetic import write_model

# Each architecture with the variations the loader must handle: GQA, a head_dim that is
# not hidden_size / heads, untied output embeddings, q/k/v biases (Qwen2).
MODEL_VARIANTS = {
    "qwen3": dict(architecture="Qwen3ForCausalLM"),
    "qwen3-untied": dict(architecture="Qwen3ForCausalLM", tie_word_embeddings=False, head_dim=64),
    "qwen2": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=1),
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, num_key_value_heads=4,
                  max_shard_size="100KB"),   # several safetensors files
    "llama3-rope": dict(architecture="LlamaForCausalLM", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=None, num_attention_heads=8, head_dim=16),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random models saved by transformers, created on first use."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(variant: str) -> str:
        if variant not in made:
            path = os.path.join(root, variant)
            made[variant] = write_model(path, seed=len(made), **MODEL_VARIANTS[variant])
        return made[variant]

    return get


@pytest.fixture(scope="session")
def qwen3_dir(model_dirs):
    return model_dirs("qwen3")
