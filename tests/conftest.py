import os

import pytest

from otvllm.synthetic import write_model
from tests.helpers import MODEL_VARIANTS

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
