"""A real SmolLM2 worker's OpenAI HTTP API, driven by the official ``openai`` client and ``curl``.

The same request through HTTP and gRPC gives the same tokens; logprobs obey what greedy sampling
implies; a client that hangs up frees the sequence; errors come in OpenAI's shape and status.
"""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import openai
import pytest
from conftest import free_port
from openai_fixtures import MODEL, QUESTION, curl, error_of, grpc_tokens, sse_events
from worker_fixtures import WORKER_ARGS, scrape, tokenize, wait_idle

from kvmesh.v1 import inference_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def worker(worker_launcher):
    http_port = free_port()
    w = worker_launcher.start("openai-w", extra=[*WORKER_ARGS, "--http-port", str(http_port)])
    w.http_port = http_port
    return w


@pytest.fixture
def base_url(worker) -> str:
    return f"http://127.0.0.1:{worker.http_port}/v1"


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_models_health_and_ready(client, worker) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert curl(f"http://127.0.0.1:{worker.http_port}/health")[0] == 200
    status, body = curl(f"http://127.0.0.1:{worker.http_port}/ready")
    assert (status, json.loads(body)) == (200, {"status": "ready"})


async def test_completion_tokens_match_grpc_greedy(client, worker) -> None:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        prompt_ids = await tokenize(channel, "The capital of France is")
    ids, text = await grpc_tokens(
        worker.address,
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt_ids),
            sampling=pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        ),
    )
    answer = await asyncio.to_thread(
        client.completions.create, model=MODEL, prompt=prompt_ids, max_tokens=12, temperature=0,
        logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    choice = answer.choices[0]
    assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == ids
    assert choice.text == text and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(prompt_ids) and answer.usage.completion_tokens == 12


async def test_chat_stream_equals_whole_answer_and_reports_usage(base_url) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as aclient:
        messages = [{"role": "user", "content": QUESTION}]
        whole = await aclient.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=20
        )
        assert "Paris" in whole.choices[0].message.content
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=20, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]


def test_chat_logprobs_follow_greedy_sampling(client) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob)
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in tops) <= 1.0 + 1e-4
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


async def test_logprobs_match_transformers(client, worker, smollm_dir) -> None:
    """The worker's logprobs (sampled token and top 5) against transformers' own forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    async with grpc.aio.insecure_channel(worker.address) as channel:
        prompt_ids = await tokenize(channel, "The capital of France is")
    answer = await asyncio.to_thread(
        client.completions.create, model=MODEL, prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=5,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    lp = answer.choices[0].logprobs
    generated = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
    reference = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    for i, token in enumerate(generated):
        assert lp.token_logprobs[i] == pytest.approx(reference[i, token].item(), abs=2e-3)
        values, ids = reference[i].topk(5)
        ours = {int(t.removeprefix("token_id:")): v for t, v in lp.top_logprobs[i].items()}
        assert set(ours) == set(ids.tolist())
        for token_id, value in zip(ids.tolist(), values.tolist()):
            assert ours[token_id] == pytest.approx(value, abs=2e-3)


def test_n_seeds_stop_and_echo(client) -> None:
    sampled = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=7
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    again = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=7
    )
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in sampled.choices}) > 1  # seed, seed+1, ... differ
    stopped = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, stop=["Paris"]
    )
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, echo=True
    )
    assert echoed.choices[0].text.startswith("The capital of France is")


def test_user_salts_the_prefix_cache(client) -> None:
    prompt = "Rules: " + " ".join(f"rule {i} is to be kind." for i in range(40))

    def cached(user: str) -> int:
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, user=user)
        return answer.usage.prompt_tokens_details.cached_tokens

    cached("tenant-a")
    assert cached("tenant-a") >= 16 * 10
    assert cached("tenant-b") == 0


def test_errors_have_openai_shape_and_status(client, worker) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="hi")
    for bad in ({"max_tokens": -1}, {"temperature": "hot"}, {"top_p": 0}, {"logprobs": 99}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", extra_body=bad)
        assert err.value.body["type"] == "invalid_request_error"
    url = f"http://127.0.0.1:{worker.http_port}"
    cases = {
        "bad JSON": (["-d", "{not json"], 400),
        "not an object": (["-d", "[1, 2]"], 400),
        "empty prompt": (["-d", '{"prompt": ""}'], 400),
        "image part": (["-d", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'], 400),
        "oversize": (["-d", "@-"], 413),
    }
    for name, (args, status) in cases.items():
        path = "/v1/chat/completions" if "part" in name else "/v1/completions"
        if name == "oversize":
            big = json.dumps({"prompt": "x" * (9 * 1024 * 1024)})
            got = _curl_stdin(url + path, big)
        else:
            got = curl(url + path, *args)
        assert got[0] == status, (name, got)
        error_of(got[1])
    status, body = curl(url + "/v2/nothing")
    assert status == 404 and error_of(body)


def _curl_stdin(url: str, data: str) -> tuple[int, str]:
    import subprocess

    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--data-binary", "@-", url],
        input=data, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


async def test_curl_stream_and_hang_up_frees_the_sequence(worker) -> None:
    url = f"http://127.0.0.1:{worker.http_port}/v1/completions"
    body = json.dumps({"prompt": "Count:", "max_tokens": 5, "stream": True, "temperature": 0})
    status, out = await asyncio.to_thread(curl, url, "-H", "Content-Type: application/json", "-d", body)
    events = sse_events(out)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    long = json.dumps({"prompt": "Count:", "max_tokens": 2000, "stream": True, "ignore_eos": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.http_port)
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(long)}\r\n\r\n{long}".encode()
    )
    await writer.drain()
    assert b"data: " in await reader.readuntil(b"data: ")  # streaming has begun
    writer.close()  # hang up mid-stream
    async with grpc.aio.insecure_channel(worker.address) as channel:
        await wait_idle(channel, timeout_s=10)  # aborted: no sequence, no KV block left


def test_metrics_endpoint_speaks_the_inference_extension_protocol(worker) -> None:
    status, _ = curl(f"http://127.0.0.1:{worker.http_port}/metrics")
    assert status == 200
    samples = scrape(worker.http_port)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):  # fmt: skip
        assert any(k.startswith(name) for k in samples), name
    info = [k for k in samples if k.startswith("vllm:cache_config_info")]
    assert info and 'block_size="16"' in info[0] and 'num_gpu_blocks="256"' in info[0]
    assert any(k.startswith("vllm:lora_requests_info") for k in samples)
    assert scrape(worker.metrics_port)  # the dedicated metrics port still serves the same registry
