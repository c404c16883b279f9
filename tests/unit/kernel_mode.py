"""How the Triton kernel tests run: compiled on a GPU, through Triton's interpreter on the CPU.

The interpreter is chosen by ``TRITON_INTERPRET=1``, which Triton reads when each ``@jit`` function
is defined (its own library's too), so it must be set before triton is first imported: a kernel
test module imports this module before triton and before any kvmesh kernel. When triton was
already imported compiled in this process (an earlier test module imported transformers' Llama,
which imports it), ``DELEGATE`` is true and the module runs its kernel cases in a child pytest
under the interpreter with ``run_in_interpreter``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRETED = isinstance(triton.language.zeros, InterpretedFunction)
if INTERPRETED:
    import triton.runtime.interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_numpy2(tensor, scope) -> None:
        # Triton 3.6's interpreter turns a scalar into an index with int() on a one-element 1-d
        # array, which NumPy >= 2.4 rejects (range(0, n) in a kernel fails); .item() accepts it.
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _interpreter._patch_lang_tensor = _patch_lang_tensor_numpy2
DELEGATE = not CUDA and not INTERPRETED


def run_in_interpreter(test_file: str, *pytest_args: str) -> None:
    """Runs the test module ``test_file`` (the caller's ``__file__``) in a child pytest under the
    interpreter, with ``pytest_args`` (e.g. ``-k`` filters); fails with its output if a case does."""
    path = Path(test_file).resolve()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, str(path)],
        cwd=path.parents[2],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
