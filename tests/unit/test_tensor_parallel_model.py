"""The sharded model in one process: ranks as threads over a real gloo group. Every rank's logits
equal the single-rank model's, each rank reads only its slices of the safetensors checkpoint, and
shapes that cannot be split are refused with the reason."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from kvmesh.worker.attention import AttentionMetadata
from kvmesh.worker.attention.torch_backend import TorchAttentionBackend
from kvmesh.worker.distributed.ranks import join_group
from kvmesh.worker.model import loader
from kvmesh.worker.model.llama import build_model
from kvmesh.worker.model.parallel import ParallelGroup, check_shardable, head_shard, shard_rows

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
    vocab_size=101,  # odd: the last rank's vocabulary shard ends in padding
)
CONFIGS = {
    "llama-kv2-tied": lambda: LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **COMMON),
    "llama-kv1-biases": lambda: LlamaConfig(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **COMMON
    ),
    "qwen2-kv4": lambda: Qwen2Config(num_key_value_heads=4, tie_word_embeddings=False, **COMMON),
}
BLOCK = 16


def on_ranks(size: int, fn) -> list:
    """Runs ``fn(group)`` on ``size`` threads, each a rank of one real gloo group; their results."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, size, True, wait_for_workers=False)
    results: list = [None] * size
    errors: list = []

    def rank(r: int) -> None:
        try:
            s = store if r == 0 else torch.distributed.TCPStore("127.0.0.1", store.port, size, False)
            results[r] = fn(join_group(s, r, size, torch.device("cpu")))
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def prefill_logits(model, group: ParallelGroup, ids: list[int]) -> torch.Tensor:
    attn = model.layers[0].self_attn
    n = len(ids)
    blocks = -(-n // BLOCK)
    cache = torch.zeros(2, len(model.layers), blocks, BLOCK, attn.num_kv_heads, attn.head_dim)
    meta = AttentionMetadata.whole_prompt(n, BLOCK)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), cache, meta)
        return model.compute_logits(hidden)


class CountingWeights(loader.SafetensorsWeights):
    """The real lazy checkpoint, noting which tensors are read whole (the rest are read as slices)."""

    def __init__(self, files) -> None:
        super().__init__(files)
        self.whole: list[str] = []

    def __getitem__(self, name: str) -> torch.Tensor:
        self.whole.append(name)
        return super().__getitem__(name)


@pytest.fixture(params=sorted(CONFIGS))
def checkpoint(request, tmp_path):
    torch.manual_seed(5)
    config = CONFIGS[request.param]()
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    return tmp_path, loader.load_config(tmp_path)


def test_two_ranks_compute_the_logits_of_one(checkpoint):
    path, config = checkpoint
    ids = [7, 3, 99, 100, 1, 42, 17, 5, 64, 23, 0, 88, 12, 31, 77, 9, 50, 2]  # 100: the padded shard's edge

    def run(group: ParallelGroup):
        model = build_model(config, TorchAttentionBackend(), 128, "cpu", torch.float32, group)
        state = CountingWeights(sorted(path.glob("*.safetensors")))
        model.load_weights(state)
        return prefill_logits(model, group, ids), state.whole, model

    (one, _, _) = on_ranks(1, run)[0]
    ranks = on_ranks(2, run)
    for logits, whole, model in ranks:
        assert logits.shape == (len(ids), config.vocab_size)
        torch.testing.assert_close(logits, one, rtol=1e-5, atol=1e-5)
        # Only replicated tensors are read whole: norms, and the biases added after a reduce.
        assert all("norm" in n or n.endswith(("o_proj.bias", "down_proj.bias")) for n in whole), whole
        assert model.embed_tokens.weight.shape[0] == 51  # ceil(101 / 2)
    kv = config.num_key_value_heads
    held = [m.layers[0].self_attn.shard for _, _, m in ranks]
    assert [s.q_start for s in held] == [0, 2]
    assert [s.kv_start for s in held] == ([0, 0] if kv == 1 else [0, kv // 2])


def test_head_shards_split_or_replicate_kv_heads():
    def shards(heads, kv, size):
        return [head_shard(heads, kv, _Rank(r, size)) for r in range(size)]

    assert [(s.q_start, s.q_count, s.kv_start, s.kv_count) for s in shards(64, 8, 2)] == [
        (0, 32, 0, 4),
        (32, 32, 4, 4),
    ]
    # 2 KV heads over 4 ranks: ranks 0-1 read KV head 0, ranks 2-3 KV head 1 (GQA groups of 4 queries).
    assert [(s.q_start, s.kv_start, s.kv_count) for s in shards(8, 2, 4)] == [
        (0, 0, 1),
        (2, 0, 1),
        (4, 1, 1),
        (6, 1, 1),
    ]


class _Rank(ParallelGroup):
    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


@pytest.mark.parametrize(
    ("heads", "kv", "inter", "size", "reason"),
    [
        (9, 3, 1536, 2, "9 attention heads are not divisible by 2"),
        (12, 6, 64, 4, "6 KV heads are not divisible by 4"),
        (12, 3, 64, 4, "4 is not a multiple of the 3 KV heads"),
        (8, 8, 100, 8, "intermediate size 100 is not divisible by 8"),
    ],
)
def test_shapes_that_cannot_split_are_refused_with_the_reason(heads, kv, inter, size, reason):
    def config(heads: int, kv: int, inter: int) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter
        )

    with pytest.raises(ValueError, match=reason):
        check_shardable(config(heads, kv, inter), size)
    check_shardable(config(9, 3, 1536), 3)  # SmolLM2-135M's heads: 3 ranks hold 3 query and 1 KV head each


def test_shard_rows_pads_past_the_last_row():
    table = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(shard_rows(table, 0, 3, 5), table[:3])
    assert torch.equal(shard_rows(table, 3, 6, 5), torch.tensor([[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]))
