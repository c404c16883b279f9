"""Tensor parallelism on the CPU: a replica sharded over 2 (or 3) processes talking gloo gives exactly
the greedy tokens of the same model on one rank, in float32, for random Llama and Qwen2 configs
(split and replicated KV heads, biases on every projection, tied and untied heads, a vocabulary that
does not divide evenly) and for SmolLM2-135M; ranks are real processes started by rank 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from kvmesh.worker import LLM, SamplingParams

pytestmark = pytest.mark.integration

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    # 2 KV heads over 2 ranks: one each; tied embeddings share the vocabulary shard.
    "llama-gqa-tied": lambda v: LlamaConfig(
        vocab_size=v, num_key_value_heads=2, tie_word_embeddings=True, **COMMON
    ),
    # 1 KV head over 2 ranks: replicated; llama3 RoPE and a head_dim of its own.
    "llama-1kv-replicated": lambda v: LlamaConfig(
        vocab_size=v,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **COMMON,
    ),
    # Biases on q/k/v, o, gate/up and down (row-parallel biases are added once, after the reduce),
    # and an odd vocabulary: the last rank's shard ends in padding.
    "llama-bias-odd-vocab": lambda v: LlamaConfig(
        vocab_size=v + 1,
        num_key_value_heads=4,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        **COMMON,
    ),
    "qwen2-bias-gqa": lambda v: Qwen2Config(
        vocab_size=v, num_key_value_heads=2, tie_word_embeddings=False, **COMMON
    ),
    "qwen2-1kv-tied": lambda v: Qwen2Config(
        vocab_size=v, num_key_value_heads=1, tie_word_embeddings=True, **COMMON
    ),
}
PROMPTS = ["Hello there, how are you today?", "Numbers: 3 1 4 1 5 9 2 6", "A", "The capital of France is"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name: state, parent pid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _child_pids(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    out.add(int(entry))
            except OSError:
                continue
    return out


def _rank_pids(pid: int) -> list[int]:
    """Tensor-parallel ranks started under ``pid`` (as its children, or deeper)."""
    found, todo = [], [pid]
    while todo:
        for child in _child_pids(todo.pop()):
            todo.append(child)
            if "rank_main" in Path(f"/proc/{child}/cmdline").read_text(errors="replace"):
                found.append(child)
    return found


def _generate(model: str, tp: int, prompts: list[list[int]], **settings) -> list[list[int]]:
    llm = LLM(model, tensor_parallel_size=tp, dtype="float32", device="cpu", **settings)
    try:
        if tp > 1:
            ranks = llm.engine.runner.ranks
            assert len(ranks.pids) == tp - 1 and set(ranks.pids) <= _child_pids(os.getpid())
            attn = llm.engine.runner.model.layers[0].self_attn
            assert llm.engine.runner.kv_cache.shape[4] == attn.num_kv_heads  # this rank's heads only
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.engine.runner.close()
        if tp > 1:
            assert all(llm.engine.runner.ranks.procs[i].poll() == 0 for i in range(tp - 1))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory, smollm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(11)
    config = CONFIGS[request.param](len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_ranks_give_the_tokens_of_one(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # A small token budget chunks the prompts, so mixed prefill/decode steps cross the ranks too.
    settings = dict(num_blocks=64, max_num_batched_tokens=16)
    one = _generate(str(model_dir), 1, prompts, **settings)
    two = _generate(str(model_dir), 2, prompts, **settings)
    assert two == one
    assert all(len(t) == GREEDY.max_tokens for t in two)


def test_smollm2_on_three_ranks_gives_the_tokens_of_one(smollm_dir):
    """SmolLM2-135M has 9 query and 3 KV heads: 3 ranks hold 3 and 1 each (2 cannot split it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    one = _generate(str(smollm_dir), 1, prompts, num_blocks=64)
    three = _generate(str(smollm_dir), 3, prompts, num_blocks=64)
    assert three == one


def test_a_model_that_cannot_split_is_refused_before_any_rank_starts(smollm_dir):
    before = _child_pids(os.getpid())
    with pytest.raises(ValueError, match="9 attention heads are not divisible by 2"):
        LLM(str(smollm_dir), tensor_parallel_size=2, device="cpu")
    assert _child_pids(os.getpid()) == before


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama-gqa-tied"](len(tokenizer)), dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-tp")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TP_WORKER_ARGS = [
    "--tensor-parallel-size",
    "2",
    "--device",
    "cpu",
    "--num-blocks",
    "64",
    "--max-model-len",
    "512",
]


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _stat(pid)[0] == "Z":  # exited, not yet reaped
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_rank_takes_the_worker_down_with_one_clear_error(worker_launcher, tiny_model_dir):
    worker = worker_launcher.start("tp-kill", model=str(tiny_model_dir), extra=TP_WORKER_ARGS)
    ranks = _rank_pids(worker.proc.pid)
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGKILL)
    try:
        code = worker.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after its rank died:\n{worker.log()[-3000:]}")
    log = worker.log()
    assert code == 1, log[-3000:]
    # The first error names the cause; the layers above may add their own "engine stopped" lines.
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors and f"tensor-parallel rank 1 (pid {ranks[0]}) died (signal SIGKILL)" in errors[0], log[
        -3000:
    ]
    assert "Traceback" not in log


async def test_a_two_rank_worker_serves_one_ranks_tokens_and_sigterm_stops_every_rank(
    worker_launcher, tiny_model_dir
):
    import grpc
    from transformers import AutoTokenizer

    from kvmesh.client import build_request, generate

    worker = worker_launcher.start("tp-term", model=str(tiny_model_dir), extra=TP_WORKER_ARGS)
    ranks = _rank_pids(worker.proc.pid)
    assert len(ranks) == 1
    prompt = "The capital of France is"
    request = build_request(prompt, max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)
    async with grpc.aio.insecure_channel(worker.address) as channel:
        served = await generate(channel, request, timeout=120)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir).encode(prompt)
    assert list(served.token_ids) == _generate(str(tiny_model_dir), 1, [ids], num_blocks=64)[0]
    worker.proc.terminate()
    assert worker.proc.wait(60) == 0, worker.log()[-3000:]
    assert _wait_gone(ranks[0], 15)
    assert " ERROR " not in worker.log()


def test_a_checkpoint_that_fails_to_load_raises_on_rank_0_and_ends_every_rank(tmp_path, tiny_model_dir):
    """Every rank finds the weight missing; rank 0 raises the loader's error (the process lives on)
    and its ranks are gone, with no STOP sent into a start-up collective."""
    import gc

    from safetensors.torch import load_file, save_file

    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    (weights,) = tiny_model_dir.glob("*.safetensors")
    state = load_file(weights)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / weights.name, metadata={"format": "pt"})
    before = set(_rank_pids(os.getpid()))
    with pytest.raises(ValueError, match="weights missing from the checkpoint") as caught:
        LLM(str(tmp_path), tensor_parallel_size=2, device="cpu", num_blocks=16)
    del caught  # its traceback holds the runner; collecting it stops the ranks
    gc.collect()
    deadline = time.monotonic() + 15
    while set(_rank_pids(os.getpid())) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_rank_pids(os.getpid())) - before
