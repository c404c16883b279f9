"""kvmesh: Kubernetes-native LLM inference (worker, gateway, operator).

The subpackages ``kvmesh.worker``, ``kvmesh.gateway`` and ``kvmesh.operator``
live in the repository's top-level folders. Installed wheels map them here
through setuptools' package-dir; in a source checkout (editable install or
running from the repository root) the repository root is appended to this
package's search path so the same names resolve to those folders. The folders
themselves carry no ``__init__.py``: ``operator/`` must never become an
importable top-level package, or it would shadow the standard library.
"""

import os as _os

__version__ = "0.1.0"

_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo_root, "pyproject.toml")) and _os.path.isdir(
    _os.path.join(_repo_root, "worker")
):
    __path__.append(_repo_root)  # type: ignore[name-defined]
