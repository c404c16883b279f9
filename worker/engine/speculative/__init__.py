"""Speculative decoding: proposers guess a sequence's next tokens cheaply, the target model
verifies them all in one forward pass, and rejection sampling keeps the target's distribution.

- ``ngram.py``: prompt lookup, the continuation of the latest earlier match of the last n tokens.
- ``draft.py``: a smaller model sharing the tokenizer, on its own paged KV cache.
- ``rejection.py``: greedy acceptance and speculative sampling over the verified positions.
- ``decoder.py``: one speculative step inside the engine's continuous batch.
"""

from kvmesh.worker.engine.speculative.decoder import SpeculativeDecoder

__all__ = ["SpeculativeDecoder"]
