"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flattened batch of tokens.

The architectures differ in three switches: bias on q/k/v (Qwen2), RMSNorm on each
head of q and k (Qwen3), and tied input/output embeddings.
"""

from collections.abc import Callable

import torch
from torch import nn

from otvllm.layers.attention import Attention, ForwardContext
from otvllm.layers.basic import MergedLinear, RMSNorm, RotaryEmbedding, SiluAndMul
from otvllm.layers.parallel import SINGLE, TensorParallel, embedding, lm_head, row_linear
from otvllm.models.spec import ModelSpec


class DecoderAttention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, layer_index: int, tp: TensorParallel):
        super().__init__()
        # With tensor parallelism, this rank's heads only.
        self.num_heads, self.num_kv_heads = spec.num_heads // tp.size, spec.num_kv_heads // tp.size
        self.head_dim = spec.head_dim
        q_size, kv_size = self.num_heads * spec.head_dim, self.num_kv_heads * spec.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = MergedLinear(spec.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     bias=spec.qkv_bias)
        self.o_proj = row_linear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias, tp)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, spec.head_dim, spec.head_dim ** -0.5, layer_index)
        # ops/triton_rope_store.norm_rope_store where the model runs fused (set at load), else None
        self.fused_norm_rope_store: Callable | None = None

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """From the q/k/v projection's output (the layer computes it, with the norm before it)."""
        if self.fused_norm_rope_store is None:
            q = self._norm_rope_store(positions, qkv, ctx)
        else:
            q = self._fused_norm_rope_store(positions, qkv, ctx)
        out = self.attn(q, ctx)
        return self.o_proj(out.flatten(1))

    def _norm_rope_store(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q/k norm, rotary and the K/V store, layer by layer (the reference); returns q."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        self.attn.store(k, v, ctx)
        return q

    def _fused_norm_rope_store(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The same in one kernel; returns q."""
        q_weight, k_weight, eps = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                                   if self.q_norm is not None else (None, None, 0.0))
        return self.fused_norm_rope_store(qkv, positions, self.rotary.cos, self.rotary.sin, q_weight, k_weight, eps,
                                          self.attn.k_cache, self.attn.v_cache, ctx.slot_mapping,
                                          self.num_heads, self.num_kv_heads)


class DecoderMLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel):
        super().__init__()
        size = spec.intermediate_size // tp.size
        self.gate_up_proj = MergedLinear(spec.hidden_size, {"gate_proj": size, "up_proj": size}, bias=spec.mlp_bias)
        self.down_proj = row_linear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp)
        self.act = SiluAndMul()

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """From the gate/up projection's output (the layer computes it, with the norm before it)."""
        return self.down_proj.forward_silu_and_mul(gate_up, self.act)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, layer_index: int, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec, rotary, layer_index, tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = DecoderMLP(spec, tp)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it is added): each residual
        add is fused with the norm that follows it, and at few tokens both with the projection
        after them (MergedLinear.forward_rms_norm)."""
        qkv, residual = self.self_attn.qkv_proj.forward_rms_norm(x, residual, self.input_layernorm)
        x = self.self_attn(positions, qkv, ctx)
        gate_up, residual = self.mlp.gate_up_proj.forward_rms_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(gate_up), residual

    def projection_calls(self, x: torch.Tensor) -> dict[str, Callable[[], object]]:
        """Each weight product of this layer called as forward calls it (with the norm before it or
        the activation inside it), on random inputs of x's tokens: start-up times them on cuBLAS and
        on the GEMV (core/gemv_choice.py)."""
        attn, mlp = self.self_attn, self.mlp
        heads = torch.randn(x.shape[0], attn.o_proj.weight.shape[1], dtype=x.dtype, device=x.device)
        gate_up = torch.randn(x.shape[0], 2 * mlp.down_proj.weight.shape[1], dtype=x.dtype, device=x.device)
        return {"self_attn.qkv_proj": lambda: attn.qkv_proj.forward_rms_norm(x, x, self.input_layernorm),
                "self_attn.o_proj": lambda: attn.o_proj(heads),
                "mlp.gate_up_proj": lambda: mlp.gate_up_proj.forward_rms_norm(x, x, self.post_attention_layernorm),
                "mlp.down_proj": lambda: mlp.down_proj.forward_silu_and_mul(gate_up, mlp.act)}


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = embedding(spec.vocab_size, spec.hidden_size, tp)
        rotary = RotaryEmbedding(spec.inv_freq, spec.rope_scaling, max_positions)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary, i, tp) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm(x, residual)[0]


class DecoderForCausalLM(nn.Module):
    # checkpoint projection name -> (merged module attribute, shard)
    packed_modules = {
        "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
        "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
    }

    def __init__(self, spec: ModelSpec, max_positions: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.spec, self.tp = spec, tp
        self.model = DecoderModel(spec, max_positions, tp)
        self.lm_head = lm_head(spec.hidden_size, spec.vocab_size, tp)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states of every token: [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[num_tokens, vocab_size]; with tensor parallelism on rank 0 only (None elsewhere)."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def fuse_norm_rope_store(self, kernel: Callable | None) -> None:
        """Make every layer run its q/k norm, rotary and K/V store as `kernel` (the signature of
        ops/triton_rope_store.norm_rope_store), or, with None, layer by layer."""
        for layer in self.model.layers:
            layer.self_attn.fused_norm_rope_store = kernel

    def traced_parts(self) -> list[tuple[str, int | None, nn.Module, nn.Module]]:
        """(part, layer index or None, the module a part starts with, the one it ends with) for
        every part a forward runs, in order: a tracer at level debug gives each a span, so that a
        forward's spans add up to it. Attention starts with the q/k/v projection and the MLP with
        gate/up, which the layer calls before the block (never fused with the norm at debug,
        which runs eagerly, without the GEMV)."""
        m = self.model
        parts = [("embedding", None, m.embed_tokens, m.embed_tokens)]
        for i, layer in enumerate(m.layers):
            attn, mlp = layer.self_attn, layer.mlp
            parts += [("input_norm", i, layer.input_layernorm, layer.input_layernorm),
                      ("attention", i, attn.qkv_proj, attn),
                      ("post_attention_norm", i, layer.post_attention_layernorm, layer.post_attention_layernorm),
                      ("mlp", i, mlp.gate_up_proj, mlp)]
        return parts + [("final_norm", None, m.norm, m.norm), ("lm_head", None, self.lm_head, self.lm_head)]
