"""Tensor parallelism on CUDA (NCCL). With one GPU: the group kvmesh builds (gloo for host messages,
NCCL for tensors) runs its collectives eagerly and inside a captured CUDA graph, as the decode graphs
of a sharded model do. With two or more GPUs: TP=2 gives the greedy tokens of TP=1 with CUDA graphs on.
Skipped without CUDA (the CPU tests in test_tensor_parallel.py cover the sharding itself)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_nccl_collectives_run_eagerly_and_inside_a_cuda_graph():
    from kvmesh.worker.distributed.ranks import join_group

    device = torch.device("cuda", 0)
    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    group = join_group(store, 0, 1, device)
    nccl = group.device_pg
    x = torch.arange(8, dtype=torch.float32, device=device)
    nccl.allreduce([x]).wait()
    torch.testing.assert_close(x, torch.arange(8.0, device=device))  # one rank: the sum is itself
    flat = torch.empty(1, 8, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as CudaGraphRunner.capture does
        nccl.allreduce([x]).wait()
        nccl._allgather_base(flat, x).wait()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 2
        nccl.allreduce([y]).wait()
        nccl._allgather_base(flat, y).wait()
        out = flat.sum(0) + 1
    x.copy_(torch.full((8,), 3.0, device=device))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, torch.full((8,), 7.0, device=device))
    # The host group is gloo over loopback either way.
    t = torch.tensor([5])
    group.host_pg.broadcast(t, 0).wait()
    assert t.item() == 5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_give_the_tokens_of_one(tmp_path, smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kvmesh.worker import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [tokenizer.encode(p) for p in ("Hello there", "Numbers: 3 1 4 1 5", "A", "The capital of")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for tp in (1, 2):
        llm = LLM(str(tmp_path), tensor_parallel_size=tp, dtype="float32", gpu_memory_utilization=0.3)
        try:
            assert llm.engine.runner.graphs is not None  # decode steps replay captured graphs
            outs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.engine.runner.close()
            del llm
            torch.cuda.empty_cache()
    assert outs[2] == outs[1]
    shutil.rmtree(tmp_path, ignore_errors=True)
