"""Triton kernels for the worker (attention, KV-cache writes). Imported lazily:
they need ``triton``, which only the GPU path (or the interpreter in tests) uses."""
