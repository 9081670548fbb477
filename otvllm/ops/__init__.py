"""Attention kernels and their torch reference.

ATTENTION_BACKENDS names the implementations a user can pick (EngineConfig.attention_backend,
besides "auto"); kept here, free of torch, so that the CLI can list them without importing it."""

ATTENTION_BACKENDS = ("torch", "triton", "flash_attn")
