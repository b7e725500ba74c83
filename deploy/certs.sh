#!/usr/bin/env bash
# deploy/certs.sh [DIR] — the daemons' mutual-TLS certificates for the current cluster.
#
# Creates (or reuses) the migrate CA in DIR (default ~/.config/migrate/certs, 0700), issues a
# certificate for every node of the cluster (`kubectl get nodes`) and one named `operator` for
# the CLI user, then creates or updates the Secret migrate-tls in namespace migrate with
#   ca.crt, and for every node <node>.crt and <node>.key
# (deploy/entrypoint.sh picks its node's pair on each node). ca.key and DIR/operator/ stay with
# the user: ca.key never goes into the cluster.
#
# Run it again after adding nodes: `migrate certs init` reuses the CA in DIR, so certificates
# already handed out stay valid, and the Secret gains the new nodes.
#
# Needs: kubectl with a context that may read nodes and write Secrets in namespace migrate;
# the migrate binary (MIGRATE=/path/to/migrate, else `migrate` on PATH, else this
# repository's target/release/migrate).
set -euo pipefail

DIR=${1:-${MIGRATE_CERTS_DIR:-$HOME/.config/migrate/certs}}
NAMESPACE="migrate"
SECRET="migrate-tls"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "certs.sh: error: $*" >&2; exit 1; }
log() { echo "certs.sh: $*" >&2; }

command -v kubectl >/dev/null || die "kubectl not found"
if [[ -n ${MIGRATE:-} ]]; then
    migrate=$MIGRATE
elif command -v migrate >/dev/null; then
    migrate=$(command -v migrate)
elif [[ -x $HERE/../target/release/migrate ]]; then
    migrate=$HERE/../target/release/migrate
else
    die "the migrate binary was not found: build it (cargo build --release -p cli) or set MIGRATE=PATH"
fi

mapfile -t nodes < <(kubectl get nodes -o name | sed 's|^node/||')
((${#nodes[@]})) || die "kubectl get nodes returned no node: is the kubeconfig right?"
for node in "${nodes[@]}"; do
    [[ $node != operator ]] || die "a node is named 'operator', the name of the CLI user's certificate"
    # migrate certs init accepts DNS labels only (no dots): say which node, before it fails.
    [[ $node =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] \
        || die "node name '$node' is not a DNS label (lowercase letters, digits, '-'): migrate certificates name nodes by label"
done

# The folder holds the CA key: private from the start.
(umask 077 && mkdir -p "$DIR")
chmod 0700 "$DIR"
if [[ -f $DIR/ca.key ]]; then
    log "reusing the CA in $DIR"
else
    log "creating a new CA in $DIR"
fi

args=()
for node in "${nodes[@]}"; do
    args+=(--name "$node")
done
"$migrate" certs init --out "$DIR" "${args[@]}" --name operator >&2

# The Secret: ca.crt and one pair per node. `create --dry-run=client | apply` creates it or
# replaces its content; nodes gone from the cluster drop out of it.
kubectl get namespace "$NAMESPACE" >/dev/null 2>&1 || kubectl create namespace "$NAMESPACE" >/dev/null
files=(--from-file="ca.crt=$DIR/ca.crt")
for node in "${nodes[@]}"; do
    files+=(--from-file="$node.crt=$DIR/$node/node.crt" --from-file="$node.key=$DIR/$node/node.key")
done
kubectl -n "$NAMESPACE" create secret generic "$SECRET" "${files[@]}" --dry-run=client -o yaml \
    | kubectl apply -f - >&2

# The node folders were only the Secret's source: the cluster holds them now.
for node in "${nodes[@]}"; do
    rm -rf -- "${DIR:?}/$node"
done

log "Secret $NAMESPACE/$SECRET holds ca.crt and the certificates of: ${nodes[*]}"
log "kept here (never in the cluster): $DIR/ca.key, and the CLI's folder $DIR/operator"
log "use it as: migrate POD --from NODE --to NODE --certs $DIR/operator"
