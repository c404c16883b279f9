"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Weights use transformers' names except for two fused projections, which the
loader builds: ``qkv_proj`` (q, k, v stacked) and ``gate_up_proj``. Under tensor
parallelism (kvmesh.worker.model.parallel) every rank builds the same modules with
its shard's shapes and reads only its slices of the checkpoint. A quantized model's four linear
layers per decoder layer are QuantLinear modules (kvmesh.worker.model.quant) holding the
checkpoint's own tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from kvmesh.worker.attention import AttentionBackend, AttentionMetadata
from kvmesh.worker.model.layers import (
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    store_linear_weights_transposed_,
    use_fused_kernels,
)
from kvmesh.worker.model.parallel import (
    SINGLE,
    ParallelGroup,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_shardable,
    head_shard,
    shard_rows,
    split_range,
)
from kvmesh.worker.model.quant import LinearMethod, QuantLinear, process_after_loading

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2"}


def _linear(in_features: int, out_features: int, bias: bool, quant: LinearMethod | None) -> nn.Module:
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantLinear(in_features, out_features, bias, quant)


def _row_parallel(in_features, out_features, bias, group, quant: LinearMethod | None) -> nn.Module:
    if quant is None:
        return RowParallelLinear(in_features, out_features, bias, group)
    return QuantLinear(in_features, out_features, bias, quant)  # a single rank (ModelRunner checks)


class Attention(nn.Module):
    """This rank's query heads and the KV heads they read (all of them on a single rank)."""

    def __init__(
        self, config, layer_idx: int, backend: AttentionBackend, group: ParallelGroup = SINGLE, quant=None
    ):
        super().__init__()
        total_kv = config.num_key_value_heads or config.num_attention_heads
        self.shard = head_shard(config.num_attention_heads, total_kv, group)
        self.num_heads, self.num_kv_heads = self.shard.q_count, self.shard.kv_count
        self.head_dim = _head_dim(config)
        self.layer_idx = layer_idx
        self.backend = backend
        self.scale = self.head_dim**-0.5
        qkv_bias, o_bias = _attention_biases(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = _linear(config.hidden_size, q_size + 2 * kv_size, qkv_bias, quant)
        self.o_proj = _row_parallel(q_size * group.size, config.hidden_size, o_bias, group, quant)
        # An fp8 KV cache's float32 [k_scale, v_scale] on the device, set once by the model runner
        # (kvmesh.worker.attention.kv_quant); None for a 16-bit cache. A plain attribute, not a
        # buffer: the model's dtype cast must not touch it.
        self.kv_scale: torch.Tensor | None = None

    def forward(self, positions, hidden, rotary: RotaryEmbedding, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(hidden)
        qk_size = self.q_size + self.kv_size  # queries and keys rotate together, as one tensor
        qk = qkv[:, :qk_size].unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim))
        v = qkv[:, qk_size:].unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = rotary(positions, qk, self.num_heads, meta.rope_rows)
        k_cache, v_cache = kv_cache[0][self.layer_idx], kv_cache[1][self.layer_idx]
        self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.kv_scale)
        out = self.backend.forward(q, k_cache, v_cache, meta, self.scale, self.kv_scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """This rank's columns of gate and up (stacked: its gate slice, then its up slice)."""

    def __init__(self, config, group: ParallelGroup = SINGLE, quant: LinearMethod | None = None) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        local = config.intermediate_size // group.size
        self.gate_up_proj = _linear(config.hidden_size, 2 * local, bias, quant)
        self.down_proj = _row_parallel(config.intermediate_size, config.hidden_size, bias, group, quant)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, config, layer_idx: int, backend: AttentionBackend, group: ParallelGroup = SINGLE, quant=None
    ):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, backend, group, quant)
        self.mlp = MLP(config, group, quant)
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
        self,
        config,
        backend: AttentionBackend,
        max_positions: int,
        rotary: RotaryEmbedding | None = None,
        group: ParallelGroup = SINGLE,
        quant: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model type {config.model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        check_shardable(config, group.size)
        self.config = config
        self.group = group
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, group, quant) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = rotary or RotaryEmbedding(config, head_dim, max_positions)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, group)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if meta.rope_rows is None:  # per-step state rides on the step's metadata, set once here
            meta.rope_rows = self.rotary.rows(positions)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, self.rotary, kv_cache, meta)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of ``hidden`` over the whole vocabulary (gathered from every rank); into
        ``out`` when given (a CUDA graph's static buffer)."""
        logits = self.lm_head.logits(hidden)
        return logits.float() if out is None else out.copy_(logits)

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a transformers state dict in, fusing q/k/v and gate/up, and keeping only this
        rank's shard. ``state`` may be lazy (loader.SafetensorsWeights): with ``get_slice`` each
        shard is read from its file as a slice, never the whole tensor."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        getter = getattr(state, "get_slice", None)

        def source(name: str):
            if name not in state:
                return None
            return getter(name) if getter is not None else state[name]

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name}: expected {tuple(param.shape)}, got {tuple(tensor.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)

        group, cfg = self.group, self.config
        head_dim = _head_dim(cfg)
        inter = split_range(cfg.intermediate_size, group)
        for i, layer in enumerate(self.layers):
            p, attn = f"model.layers.{i}.", layer.self_attn.shard
            q_rows = (attn.q_start * head_dim, (attn.q_start + attn.q_count) * head_dim)
            kv_rows = (attn.kv_start * head_dim, (attn.kv_start + attn.kv_count) * head_dim)
            fused = (
                ("self_attn.qkv_proj", [f"self_attn.{x}_proj" for x in "qkv"], [q_rows, kv_rows, kv_rows]),
                ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"], [inter, inter]),
            )
            for target, names, rows in fused:
                module = layer.get_submodule(target)
                if isinstance(module, QuantLinear):  # a single rank: whole parts, joined by the method
                    for kind in (*module.method.suffixes, "bias"):
                        parts = [source(f"{p}{n}.{kind}") for n in names]
                        if all(t is not None for t in parts):
                            parts = [t[...] for t in parts]  # [...]: 0-dim scales too
                            sizes = [b - a for a, b in rows]
                            joined = (
                                module.method.fuse(kind, parts, sizes) if kind != "bias" else torch.cat(parts)
                            )
                            put(f"layers.{i}.{target}.{kind}", joined)
                    continue
                for kind in ("weight", "bias"):
                    parts = [source(f"{p}{n}.{kind}") for n in names]
                    if all(t is not None for t in parts):
                        put(
                            f"layers.{i}.{target}.{kind}",
                            torch.cat([t[a:b] for t, (a, b) in zip(parts, rows)]),
                        )
            for short, cols in (("self_attn.o_proj", q_rows), ("mlp.down_proj", inter)):
                weight = source(f"{p}{short}.weight")
                module = layer.get_submodule(short)
                if isinstance(module, QuantLinear):  # joined from one part: shaped as fused layers' are
                    for kind in module.method.suffixes:  # (e.g. a per-tensor scale becomes rows)
                        part = source(f"{p}{short}.{kind}")
                        if part is not None:
                            joined = module.method.fuse(kind, [part[...]], [module.out_features])
                            put(f"layers.{i}.{short}.{kind}", joined)
                    continue  # its bias loads by name, below
                if weight is not None:  # row-parallel: this rank's input columns; the bias whole
                    put(f"layers.{i}.{short}.weight", weight[:, cols[0] : cols[1]])
        for module, name in ((self.embed_tokens, "embed_tokens.weight"), (self.lm_head, "lm_head.weight")):
            table = source(name if name.startswith("lm_head") else f"model.{name}")
            if table is not None and name in own:  # a tied head is the embedding's parameter
                start = group.rank * module.rows
                put(name, shard_rows(table, start, start + module.rows, cfg.vocab_size))
        for name in state:  # names first: a lazy state reads only the tensors it copies
            if not name.startswith("model.") and not name.startswith("lm_head."):
                continue
            short = name.removeprefix("model.")
            if short in own and short not in loaded:
                put(short, state[name])
        if cfg.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(own) - loaded)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:8]}")
        process_after_loading(self)

    def init_random(self, seed: int) -> None:
        """Random weights in place of a checkpoint (benchmarks of shapes no one has on disk): each
        rank draws its own shard, norms are ones. The tokens such a model produces mean nothing."""
        device = self.embed_tokens.weight.device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1009 + self.group.rank)
        quantized = {name for name, m in self.named_modules() if isinstance(m, QuantLinear)}
        with torch.no_grad():
            for name in sorted(quantized):  # a dense random weight, quantized by the layer's method
                module = self.get_submodule(name)
                dtype = self.embed_tokens.weight.dtype
                dense = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
                module.method.load_dense(module, dense.normal_(0.0, 0.02, generator=gen))
                if module.bias is not None:
                    module.bias.zero_()
            for name, param in self.named_parameters():
                if name.rpartition(".")[0] in quantized:
                    continue
                if "norm" in name:
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=gen)
        process_after_loading(self)


def build_model(
    config,
    backend: AttentionBackend,
    max_positions: int,
    device,
    dtype,
    group: ParallelGroup = SINGLE,
    quant: LinearMethod | None = None,
) -> LlamaForCausalLM:
    """The model (this rank's shard of it) with its parameters allocated once, in ``dtype`` on
    ``device``, and left uninitialized: ``load_weights`` fills every one (no random init, no
    float32 copy first). With ``quant`` the linear layers hold that method's tensors, in their own
    dtypes."""
    with torch.device(device):  # the RoPE tables are plain tensors, built where they are used
        rotary = RotaryEmbedding(config, _head_dim(config), max_positions)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend, max_positions, rotary, group, quant).to(dtype)
        for name, module in model.named_modules():  # after the cast: FP8 and integer tensors keep
            if isinstance(module, QuantLinear):  # their dtypes
                module.prefix = name
                module.create_weights(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty moves meta parameters one by one: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    if torch.device(device).type == "cpu":  # faster matrix-vector products for decode
        store_linear_weights_transposed_(model)
    # Triton norms, activation and RoPE on a GPU, unless the torch reference backend was chosen.
    use_fused_kernels(model, torch.device(device).type == "cuda" and backend.name != "torch")
    return model


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o bias): Qwen2 has q/k/v biases only; Llama's attention_bias sets all four."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias
