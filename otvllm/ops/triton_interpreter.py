"""Whether the Triton kernels run compiled for a GPU or under Triton's interpreter (on the CPU,
where the tests run them): their tile sizes and launch options differ between the two."""

import os

import torch


def interpreting(device: torch.device) -> bool:
    """Whether Triton kernels on `device` run under the interpreter: any device but CUDA, or
    TRITON_INTERPRET=1."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
