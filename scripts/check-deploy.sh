#!/usr/bin/env bash
# Validates deploy/ offline, without a cluster:
#   1. every Kubernetes manifest in deploy/kubernetes except the KEDA ones,
#      against the Kubernetes OpenAPI schemas that kubernetes-validate ships
#      (strict: unknown fields fail);
#   2. scripts/check-keda.py: the KEDA ScaledObject against a schema of
#      KEDA's documented spec, the cross-references between the manifests,
#      and the Grafana dashboard's panels and metric names.
# kubernetes-validate is installed once into a venv under ~/.cache (a
# re-run reuses it). Run from anywhere; exits non-zero on any problem.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Pinned, so a new release cannot change the verdict: the schemas are
# those of this Kubernetes version, the oldest we claim to support.
KUBERNETES_VERSION=1.30.0
KUBERNETES_VALIDATE_VERSION=1.37.0
venv="${INFERQ_DEPLOY_VENV:-$HOME/.cache/inferq-deploy-venv}"
kv="$venv/bin/kubernetes-validate"

if [ "$("$kv" --version 2>/dev/null || true)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv"
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# KEDA's kinds are not in the Kubernetes schemas (kubernetes-validate would
# only warn and pass); check-keda.py validates those files instead and
# makes sure no file mixes KEDA and core objects.
manifests=()
for f in deploy/kubernetes/*.yaml; do
    if ! grep -q '^apiVersion: *keda\.sh/' "$f"; then
        manifests+=("$f")
    fi
done
if [ "${#manifests[@]}" -eq 0 ]; then
    echo "check-deploy: no Kubernetes manifests in deploy/kubernetes" >&2
    exit 1
fi

# kubernetes-validate exits 0 on a kind or apiVersion it has no schema for
# (a typo such as apps/v2) and only prints WARN: treat any such line as a
# failure too.
status=0
out="$("$kv" --strict --kubernetes-version "$KUBERNETES_VERSION" "${manifests[@]}" 2>&1)" || status=$?
printf '%s\n' "$out"
if [ "$status" -ne 0 ] || printf '%s\n' "$out" | grep -qE '^(WARN|ERROR|FATAL)'; then
    echo "check-deploy: kubernetes-validate found problems in deploy/kubernetes (above)" >&2
    exit 1
fi

# The venv's Python has jsonschema and PyYAML (kubernetes-validate needs
# them), so this does not depend on what the system Python has.
if ! "$venv/bin/python" scripts/check-keda.py; then
    echo "check-deploy: scripts/check-keda.py found problems (above)" >&2
    exit 1
fi
echo "check-deploy: deploy/ is valid (Kubernetes $KUBERNETES_VERSION, KEDA 2.16 ScaledObject, Grafana dashboard)"
