"""Errors the engine raises to its callers; the server maps each to a gRPC status."""


class InvalidRequest(ValueError):
    """The request is malformed (INVALID_ARGUMENT); the message is shown to the client."""


class QueueFull(RuntimeError):
    """Too many requests are waiting (RESOURCE_EXHAUSTED)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has failed (UNAVAILABLE)."""
