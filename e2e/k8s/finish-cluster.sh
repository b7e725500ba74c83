#!/usr/bin/env bash
# e2e/k8s/finish-cluster.sh — on node1, once every node has joined (the Vagrantfile runs it
# after node2 is up): approves the kubelet serving certificates, waits for every node to be
# Ready, builds the migrate CLI (deploy/certs.sh needs it) and installs the daemons with
# deploy/install.sh. Idempotent.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$HERE/lib.sh"
need_root
[[ -f $KUBECONFIG ]] || die "$KUBECONFIG not found: run this on node1, the control plane"

mapfile -t nodes < <(kubectl get nodes -o name | sed 's|^node/||')
for node in "${nodes[@]}"; do
    wait_serving_cert "$node" 300
done
kubectl wait --for=condition=Ready node --all --timeout=300s >&2

build_cli
MIGRATE=/usr/local/bin/migrate "$REPO/deploy/install.sh"
