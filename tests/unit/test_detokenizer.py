"""Incremental detokenization never releases broken UTF-8 and never leaks a stop string."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvmesh.worker.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Ünïcödé — “quotes” and emoji 🚀🔥👩‍👩‍👧 done.",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "  leading spaces and\nnew\tlines  ",
]


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_are_whole_characters_and_add_up(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=[])
    deltas = []
    for t in ids:
        assert not detok.add(t)
        deltas.append(detok.take(final=False))
    deltas.append(detok.take(final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    # Multi-byte characters really were split across tokens, so holding back mattered.
    if "🚀" in text:
        assert any(d == "" for d in deltas[:-1])


def test_a_stop_string_split_across_tokens_is_never_streamed(tokenizer):
    text = "alpha beta STOPWORD gamma"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOPWORD"])
    streamed = ""
    stopped = False
    for t in ids:
        stopped = detok.add(t)
        if stopped:
            break
        streamed += detok.take(final=False)
    streamed += detok.take(final=True)
    assert stopped
    assert streamed == "alpha beta "
    assert "STOP" not in streamed


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["four", "two"])
    for t in ids:
        if detok.add(t):
            break
    assert detok.take(final=True) == "one "


@pytest.mark.parametrize("text", TEXTS)
def test_rust_stream_and_python_window_decoders_agree(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    fast = IncrementalDetokenizer(tokenizer, prompt, stop=[])
    slow = IncrementalDetokenizer(tokenizer, prompt, stop=[])
    assert fast.stream is not None
    slow.stream = None
    for t in ids:
        fast.add(t)
        slow.add(t)
        assert fast.take(final=False) == slow.take(final=False)
    assert fast.take(final=True) == slow.take(final=True)
