#!/usr/bin/env bash
# deploy/install.sh — installs the migrate daemons on the current cluster: the certificates
# and the Secret migrate-tls (deploy/certs.sh, which also keeps the CA and the operator's
# certificate with you), then namespace, RBAC and DaemonSet (kubectl apply -k deploy/), then
# waits until a daemon runs on every node.
#
# Options are the environment: MIGRATE_CERTS_DIR (certs.sh's folder), MIGRATE (the binary),
# ROLLOUT_TIMEOUT (default 300s).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=${ROLLOUT_TIMEOUT:-300s}

"$HERE/certs.sh"
kubectl apply -k "$HERE"
if ! kubectl -n migrate rollout status ds/migrate-daemon --timeout="$TIMEOUT"; then
    echo "install.sh: error: the DaemonSet did not become ready within $TIMEOUT; see" >&2
    echo "  kubectl -n migrate get pods -o wide" >&2
    echo "  kubectl -n migrate logs ds/migrate-daemon" >&2
    kubectl -n migrate get pods -o wide >&2 || true
    exit 1
fi
echo "install.sh: the migrate daemon runs on every node"
