"""Which attention backend an engine gets, and the reasons it gives when it cannot have one."""

import pytest
import torch

from otvllm import LLM
from otvllm.ops import backend, flash_attn4

CUDA = torch.device("cuda")


def test_cpu_gets_torch_and_refuses_gpu_backends(qwen3_dir):
    assert backend.choose_backend("auto", torch.device("cpu"), torch.float32, 32) == "torch"
    for name in ("triton", "flash_attn"):
        with pytest.raises(ValueError, match=f"attention_backend='{name}' needs a CUDA device"):
            LLM(qwen3_dir, device="cpu", attention_backend=name)


@pytest.fixture
def fa4(monkeypatch):
    """Pretend to be on a GPU where FA4 is usable or not, as the test says."""
    state = {"reason": None}
    monkeypatch.setattr(flash_attn4, "unavailable_reason", lambda device, dtype, head_dim: state["reason"])
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    return state


def test_auto_prefers_flash_attn_where_it_can_run(fa4):
    assert backend.choose_backend("auto", CUDA, torch.bfloat16, 128) == "flash_attn"
    assert backend.choose_backend("triton", CUDA, torch.bfloat16, 128) == "triton"


def test_auto_falls_back_to_triton_and_explicit_request_explains(fa4):
    fa4["reason"] = "it computes in float16 or bfloat16, not float32"
    assert backend.choose_backend("auto", CUDA, torch.float32, 128) == "triton"
    with pytest.raises(ValueError, match="'flash_attn' cannot be used: it computes in float16 or bfloat16"):
        backend.choose_backend("flash_attn", CUDA, torch.float32, 128)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.mark.parametrize("dtype,head_dim,message", [
    (torch.float32, 128, "float16 or bfloat16, not float32"),
    (torch.bfloat16, 100, "head_dim=100 is not one it supports on sm90"),
    (torch.bfloat16, 512, "head_dim=512"),
])
def test_unavailable_reasons_name_the_problem(hopper, dtype, head_dim, message):
    assert message in flash_attn4.unavailable_reason(CUDA, dtype, head_dim)


def test_missing_package_is_named_with_its_install_command(hopper, monkeypatch):
    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}")
    monkeypatch.setattr(flash_attn4.importlib, "import_module", fail)
    reason = flash_attn4.unavailable_reason(CUDA, torch.bfloat16, 128)
    assert "import flash_attn.cute" in reason and "pip install flash-attn-4" in reason


def test_older_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper or Blackwell" in flash_attn4.unavailable_reason(CUDA, torch.bfloat16, 128)
    assert flash_attn4.unavailable_reason(torch.device("cpu"), torch.bfloat16, 128) == \
        "it needs a CUDA device, not cpu"
