from kvmesh.worker.attention.backend import AttentionBackend, get_backend
from kvmesh.worker.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
