"""A GGUF file's quantized blocks, served as the file holds them (``--quantization gguf``).

A model from a .gguf file is converted once into a dense directory (kvmesh.worker.model.convert:
config, tokenizer, float32 weights). Under this method each decoder linear layer instead holds the
file's raw blocks, ``qweight uint8 [out, in / block_size * block_bytes]``, and its block type
(``layer.qtype``); the kernel (kvmesh.worker.kernels.gguf) dequantizes them inside the matrix
product on a GPU, and the CPU multiplies by ``dequantize`` of them (the reference, equal to
gguf.quants.dequantize bit for bit). Embeddings, norms and biases come from the converted
directory, as before.

The blocks are read from the memory-mapped file under transformers' names. llama.cpp's converter
permutes the rows of ``attn_q`` and ``attn_k`` (per head, rotary halves interleaved) for
``llama`` files; transformers' GGUF loader undoes it on the dequantized rows, and so does this
module, on whole rows of blocks. A fused layer (q/k/v, gate/up) whose parts differ in type, or a
layer of a type without a kernel here, is served expanded: a dense weight in the model's dtype,
read from the converted directory (the same numbers), with a log line.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from kvmesh.worker.model.quant import LinearMethod, QuantLinear, QuantSpec, add_param

log = logging.getLogger(__name__)

# The block types served in blocks: GGML type id -> (elements per block, bytes per block), as
# gguf.GGML_QUANT_SIZES has them (the kernel's arithmetic is written for these ids).
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14
BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}
TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}
# transformers' names of a decoder layer's linear weights -> GGUF's (blk.N.<name>.weight).
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# kvmesh's layers (llama.py) -> the transformers weights they hold, in order.
PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|qweight)")


def type_name(qtype: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return str(qtype)


def _halves(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 bytes ``[..., 2]`` as float32 ``[..., 1]``."""
    return raw.contiguous().view(torch.float16).float()


def dequantize(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """GGUF blocks ``uint8 [rows, bytes]`` as float32 ``[rows, elements]``, the arithmetic of
    gguf.quants in its order (the same bits). Raises ValueError for a type served without blocks."""
    if qtype not in BLOCKS:
        supported = ", ".join(TYPE_NAMES.values())
        raise ValueError(f"GGUF block type {type_name(qtype)} is not supported (supported: {supported})")
    block, nbytes = BLOCKS[qtype]
    rows = blocks.shape[0]
    b = blocks.reshape(-1, nbytes)
    if qtype in (Q4_0, Q4_1):  # in place, one float32 buffer (the CPU's product runs this per step)
        scales = _halves(b[:, : 2 if qtype == Q4_0 else 4])  # d (, m)
        qs = b[:, scales.shape[1] * 2 :]
        w = torch.empty(b.shape[0], 2, block // 2, device=b.device)
        w[:, 0].copy_(qs & 15)
        w[:, 1].copy_(qs >> 4)
        w = w.view(-1, block)
        if qtype == Q4_0:
            w.sub_(8).mul_(scales)
        else:
            w.mul_(scales[:, :1]).add_(scales[:, 1:])
    elif qtype == Q8_0:
        w = b[:, 2:].contiguous().view(torch.int8).float() * _halves(b[:, :2])
    elif qtype == Q4_K:
        d, dmin, s = _halves(b[:, :2]), _halves(b[:, 2:4]), b[:, 4:16]
        a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1).float()  # [n, 8]
        mn = torch.cat([m & 63, (c >> 4) | ((m >> 2) & 48)], dim=1).float()
        qs = b[:, 16:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(-1, 8, 32).float()
        w = ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, block)
    else:  # Q6_K
        ql, qh = b[:, :128].reshape(-1, 2, 1, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
        low = torch.cat([ql & 15, ql >> 4], dim=2).reshape(-1, 8, 32)
        high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, 8, 32)
        q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
        scales = b[:, 192:208].contiguous().view(torch.int8).float()
        w = ((_halves(b[:, 208:210]) * scales)[:, :, None] * q).reshape(-1, block)
    return w.reshape(rows, -1)


def undo_head_permutation(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter orders each head's rows as pairs (i, i + head_dim/2) interleaved;
    this restores transformers' order (rows are whole, so rows of blocks move as well)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


class GGUFFile:
    """A .gguf file's decoder linear tensors by transformers' names (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--quantization gguf: the GGUF file {path} does not exist")
        import gguf

        reader = gguf.GGUFReader(str(path))
        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = _field(reader, "general.architecture") or "llama"
        self.heads = _field(reader, f"{self.arch}.attention.head_count")
        self.kv_heads = _field(reader, f"{self.arch}.attention.head_count_kv") or self.heads

    def tensor(self, layer: int, hf_name: str):
        name = f"blk.{layer}.{GGUF_NAMES[hf_name]}.weight"
        if name not in self.tensors:
            raise ValueError(f"the GGUF file {self.path.name} has no tensor {name}")
        return self.tensors[name]

    def blocks(self, layer: int, hf_name: str) -> torch.Tensor:
        """The weight's blocks ``uint8 [out, bytes]`` in transformers' row order."""
        t = self.tensor(layer, hf_name)
        with warnings.catch_warnings():  # a read-only memory map: nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(t.data)
        if self.arch == "llama" and hf_name in ("self_attn.q_proj", "self_attn.k_proj"):
            return undo_head_permutation(rows, self.heads if "q_proj" in hf_name else self.kv_heads)
        return rows

    def layer_type(self, prefix: str, in_features: int, out_features: int) -> int | None:
        """The block type a kvmesh layer (``layers.N.self_attn.qkv_proj``, ...) is served in, or
        None when it is served expanded (parts of different types, or a type without a kernel)."""
        match = _LAYER.fullmatch(prefix)
        if match is None or match.group(2) not in PARTS:
            raise ValueError(f"GGUF: no GGUF tensors for layer {prefix!r}")
        layer, parts = int(match.group(1)), PARTS[match.group(2)]
        tensors = [self.tensor(layer, p) for p in parts]
        shape = (sum(int(t.shape[1]) for t in tensors), int(tensors[0].shape[0]))  # GGUF: reversed
        if shape != (out_features, in_features):
            raise ValueError(
                f"GGUF: {prefix} is {out_features}x{in_features} in the model but {shape[0]}x{shape[1]} in "
                f"{self.path.name}"
            )
        types = [int(t.tensor_type) for t in tensors]
        if len(set(types)) > 1:
            named = ", ".join(f"{p.rsplit('.', 1)[1]} {type_name(q)}" for p, q in zip(parts, types))
            log.info("GGUF: %s has parts of different types (%s): served expanded", prefix, named)
            return None
        if types[0] not in BLOCKS:
            log.info("GGUF: %s is %s, which has no kernel here: served expanded", prefix, type_name(types[0]))
            return None
        return types[0]


def _field(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None and field.data else None


class GGUFWeights(Mapping):
    """The tensors ``load_weights`` reads: the blocks of layers served in blocks
    (``model.layers.N.self_attn.q_proj.qweight``) from the GGUF file, everything else from the
    converted directory's tensors ``dense`` (the dense weights of those layers hidden)."""

    def __init__(self, file: GGUFFile, dense: Mapping[str, torch.Tensor], served: dict[str, int | None]):
        self.file, self.dense = file, dense
        self.blocked: set[str] = set()  # "model.layers.N.<hf name>" served in blocks
        for prefix, qtype in served.items():
            if qtype is not None:
                layer, kind = _LAYER.fullmatch(prefix).groups()
                self.blocked.update(f"model.layers.{layer}.{p}" for p in PARTS[kind])

    def _hidden(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.blocked

    def __getitem__(self, name: str) -> torch.Tensor:
        match = _HF_WEIGHT.fullmatch(name)
        if match and match.group(3) == "qweight" and name.removesuffix(".qweight") in self.blocked:
            return self.file.blocks(int(match.group(1)), match.group(2))
        if self._hidden(name):
            raise KeyError(name)
        return self.dense[name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name.endswith(".qweight"):
            return name.removesuffix(".qweight") in self.blocked
        return not self._hidden(name) and name in self.dense

    def __iter__(self) -> Iterator[str]:
        yield from (f"{n}.qweight" for n in sorted(self.blocked))
        yield from (n for n in self.dense if not self._hidden(n))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class GGUFMethod(LinearMethod):
    suffixes = ("qweight", "weight")  # blocks, or a layer served expanded

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        if "file" not in spec.params:
            raise ValueError("--quantization gguf needs a .gguf model")
        self.served: dict[str, int | None] = {}  # layer prefix -> block type (None: expanded)

    @cached_property
    def file(self) -> GGUFFile:
        return GGUFFile(self.spec.params["file"])

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        prefix = getattr(layer, "prefix", "")
        qtype = self.file.layer_type(prefix, layer.in_features, layer.out_features)
        self.served[prefix] = layer.qtype = qtype
        if qtype is None:
            add_param(layer, "weight", (layer.out_features, layer.in_features), dtype)
            return
        block, nbytes = BLOCKS[qtype]
        add_param(layer, "qweight", (layer.out_features, layer.in_features // block * nbytes), torch.uint8)

    def checkpoint_tensors(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        blocked = [q for q in self.served.values() if q is not None]
        log.info(
            "GGUF: %d linear layers in blocks (%s), %d expanded",
            len(blocked),
            ", ".join(sorted({TYPE_NAMES[q] for q in blocked})) or "none",
            len(self.served) - len(blocked),
        )
        return GGUFWeights(self.file, state, self.served)

    def load_dense(self, layer: QuantLinear, weight: torch.Tensor) -> None:
        if layer.qtype is None:
            layer.weight.copy_(weight)
            return
        import gguf

        try:
            blocks = gguf.quants.quantize(
                weight.float().cpu().numpy(), gguf.GGMLQuantizationType(layer.qtype)
            )
        except NotImplementedError as e:
            raise ValueError(f"GGUF: cannot quantize a dense weight to {type_name(layer.qtype)}") from e
        layer.qweight.copy_(torch.from_numpy(blocks))

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        if layer.qtype is None:
            return layer.weight.detach()
        return dequantize(layer.qweight, layer.qtype)

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.qtype is None:
            return F.linear(x, layer.weight, layer.bias)
        if x.is_cuda:
            from kvmesh.worker.kernels.gguf import gguf_matmul

            out = gguf_matmul(x.reshape(-1, x.shape[-1]), layer.qweight, layer.qtype)
            out = out.reshape(*x.shape[:-1], -1)
            return out if layer.bias is None else out + layer.bias
        # The CPU: the reference product (no fast quantized path; ``auto`` expands instead).
        return F.linear(x, dequantize(layer.qweight, layer.qtype).to(x.dtype), layer.bias)


METHOD = GGUFMethod
