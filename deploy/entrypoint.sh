#!/usr/bin/env bash
# The daemon image's entrypoint (deploy/Containerfile; run by deploy/daemonset.yaml).
#
# The Secret migrate-tls (namespace migrate, made by deploy/certs.sh) is mounted at SECRET_DIR
# and holds ca.crt and, for every node, <node>.crt and <node>.key. The daemon wants one folder
# with ca.crt, node.crt and node.key for its own node: this assembles it in TLS_DIR (a memory
# emptyDir: folder 0700, key 0600), then execs the daemon. Extra arguments are passed on to
# `migrate daemon` (e.g. -v).
#
# Environment (downward API): NODE_NAME (spec.nodeName), NODE_IP (status.hostIP).
set -euo pipefail

SECRET_DIR=${MIGRATE_SECRET_DIR:-/etc/migrate/secret}
TLS_DIR=${MIGRATE_TLS_DIR:-/run/migrate/tls}
STATE_DIR=${MIGRATE_STATE_DIR:-/var/lib/migrate}
SA_DIR=/var/run/secrets/kubernetes.io/serviceaccount

die() { echo "entrypoint: error: $*" >&2; exit 1; }

[[ -n ${NODE_NAME:-} ]] || die "NODE_NAME is not set (the DaemonSet sets it from spec.nodeName)"
[[ -n ${NODE_IP:-} ]] || die "NODE_IP is not set (the DaemonSet sets it from status.hostIP)"

[[ -f $SECRET_DIR/ca.crt ]] \
    || die "no ca.crt in $SECRET_DIR: the Secret migrate-tls is missing or incomplete; run deploy/certs.sh"
if [[ ! -f $SECRET_DIR/$NODE_NAME.crt || ! -f $SECRET_DIR/$NODE_NAME.key ]]; then
    die "the Secret migrate-tls has no certificate for node '$NODE_NAME' ($NODE_NAME.crt, $NODE_NAME.key):" \
        "the node was probably added after the certificates were made; run deploy/certs.sh again" \
        "(it reuses the CA and adds every current node); this container then starts at its next" \
        "restart (delete the Pod to skip the back-off)"
fi

umask 077
mkdir -p "$TLS_DIR"
chmod 0700 "$TLS_DIR"
# install copies the content and sets the mode; the Secret's files are symlinks into ..data/.
install -m 0644 "$SECRET_DIR/ca.crt" "$TLS_DIR/ca.crt"
install -m 0644 "$SECRET_DIR/$NODE_NAME.crt" "$TLS_DIR/node.crt"
install -m 0600 "$SECRET_DIR/$NODE_NAME.key" "$TLS_DIR/node.key"

# The chunk store and work folders: checkpoints hold whole process memories.
mkdir -p "$STATE_DIR"
chmod 0700 "$STATE_DIR"

echo "entrypoint: node $NODE_NAME ($NODE_IP): certificates in $TLS_DIR, state in $STATE_DIR" >&2
exec migrate daemon \
    --listen 0.0.0.0:7400 \
    --certs "$TLS_DIR" \
    --state "$STATE_DIR" \
    --kubelet "https://$NODE_IP:10250" \
    --kubelet-ca "$SA_DIR/ca.crt" \
    --kubelet-token-file "$SA_DIR/token" \
    --kubelet-checkpoints /var/lib/kubelet/checkpoints \
    "$@"
