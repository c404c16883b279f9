"""Mid-stream failover: a generation whose worker fails after streaming continues on another worker
from the prompt plus the tokens already sent, so the client sees one uninterrupted stream (as NVIDIA
Dynamo migrates requests). The gateway forwards token ids, so the continuation is exact: the next
worker prefills prompt + sent tokens and decodes on; a greedy continuation is the same text an
uninterrupted run would have produced.

Limits, by construction: a seeded or sampled request continues validly but not identically; a stop
string that straddles the failover point is missed; text a worker held back (half of a multi-byte
character) when it died is not sent again.
"""

from __future__ import annotations

from kvmesh.requests import DEFAULT_MAX_TOKENS
from kvmesh.v1 import inference_pb2


class Progress:
    """What one forwarded generation has streamed so far, and the request that carries it on."""

    def __init__(self, request: inference_pb2.GenerateRequest) -> None:
        self.original = request
        self.prompt_len = len(request.token_ids.ids)
        self.sent: list[int] = []  # token ids the client has received
        self.sent_before = 0  # of which, sent by workers that failed (the current one's prompt)
        s = request.sampling
        self.max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.sent)

    def request(self) -> inference_pb2.GenerateRequest:
        """The original request before any token was sent; afterwards, its continuation."""
        self.sent_before = len(self.sent)
        if not self.sent:
            return self.original
        cont = inference_pb2.GenerateRequest()
        cont.CopyFrom(self.original)
        cont.token_ids.ids.extend(self.sent)
        # Explicit even when the client left it unset: the budget left, not a fresh default. The
        # worker still stops at the end of the context, as the first one would have.
        cont.sampling.max_tokens = max(1, self.remaining)
        return cont

    def observe(self, response: inference_pb2.GenerateResponse) -> inference_pb2.GenerateResponse:
        """Records a response's tokens; a continuation's final usage is rewritten to the client's
        view (its prompt, every token it received)."""
        self.sent.extend(response.token_ids)
        if response.finish_reason and self.sent_before:
            usage = response.usage
            usage.prompt_tokens = self.prompt_len
            usage.completion_tokens += self.sent_before
            usage.cached_tokens = min(usage.cached_tokens, self.prompt_len)
        return response

    def finished(self, worker_id: str) -> inference_pb2.GenerateResponse:
        """The final message when every token was sent but the worker died before saying so."""
        response = inference_pb2.GenerateResponse(
            request_id=self.original.request_id,
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            worker_id=worker_id,
        )
        response.usage.prompt_tokens = self.prompt_len
        response.usage.completion_tokens = len(self.sent)
        return response
