"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Weights use transformers' names except for two fused projections, which the
loader builds: ``qkv_proj`` (q, k, v stacked) and ``gate_up_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from kvmesh.worker.attention import AttentionBackend, AttentionMetadata
from kvmesh.worker.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2"}


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = _head_dim(config)
        self.layer_idx = layer_idx
        self.backend = backend
        self.scale = self.head_dim**-0.5
        qkv_bias, o_bias = _attention_biases(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias)

    def forward(self, positions, hidden, rotary: RotaryEmbedding, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(hidden)
        qk_size = self.q_size + self.kv_size  # queries and keys rotate together, as one tensor
        qk = qkv[:, :qk_size].unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim))
        v = qkv[:, qk_size:].unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = rotary(positions, qk, self.num_heads)
        k_cache, v_cache = kv_cache[0][self.layer_idx], kv_cache[1][self.layer_idx]
        self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.backend.forward(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, backend)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, rotary, kv_cache, meta):
        """Returns ``(mlp output, residual stream before it)``: the next norm adds the two."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config, backend: AttentionBackend, max_positions: int, rotary: RotaryEmbedding | None = None
    ) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model type {config.model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = rotary or RotaryEmbedding(config, head_dim, max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, self.rotary, kv_cache, meta)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of ``hidden``; into ``out`` when given (a CUDA graph's static buffer)."""
        logits = self.lm_head(hidden)
        return logits.float() if out is None else out.copy_(logits)

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a transformers state dict in, fusing q/k/v and gate/up."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name}: expected {tuple(param.shape)}, got {tuple(tensor.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)

        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for kind in ("weight", "bias"):
                parts = [state.get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"]
                if all(t is not None for t in parts):
                    put(f"layers.{i}.self_attn.qkv_proj.{kind}", torch.cat(parts))
                parts = [state.get(f"{p}mlp.{x}_proj.{kind}") for x in ("gate", "up")]
                if all(t is not None for t in parts):
                    put(f"layers.{i}.mlp.gate_up_proj.{kind}", torch.cat(parts))
            del layer
        for name in state:  # names first: a lazy state reads only the tensors it copies
            if not name.startswith("model.") and not name.startswith("lm_head."):
                continue
            short = name.removeprefix("model.")
            if short in own and short not in loaded:
                put(short, state[name])
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(own) - loaded)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:8]}")


def build_model(config, backend: AttentionBackend, max_positions: int, device, dtype) -> LlamaForCausalLM:
    """The model with its parameters allocated once, in ``dtype`` on ``device``, and left
    uninitialized: ``load_weights`` fills every one (no random init, no float32 copy first)."""
    with torch.device(device):  # the RoPE tables are plain tensors, built where they are used
        rotary = RotaryEmbedding(config, _head_dim(config), max_positions)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend, max_positions, rotary).to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty moves meta parameters one by one: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o bias): Qwen2 has q/k/v biases only; Llama's attention_bias sets all four."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias
