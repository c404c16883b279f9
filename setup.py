"""Maps the top-level worker/, gateway/ and operator/ folders into the kvmesh namespace."""

from setuptools import find_namespace_packages, setup

SUBPACKAGE_DIRS = {"kvmesh.worker": "worker", "kvmesh.gateway": "gateway", "kvmesh.operator": "operator"}


def _packages() -> list[str]:
    found = ["kvmesh", *(f"kvmesh.{p}" for p in find_namespace_packages("kvmesh", exclude=["*__pycache__*"]))]
    for name, folder in SUBPACKAGE_DIRS.items():
        found.append(name)
        found += [f"{name}.{p}" for p in find_namespace_packages(folder, exclude=["*__pycache__*"])]
    return found


setup(packages=_packages(), package_dir=SUBPACKAGE_DIRS)
