# shellcheck shell=bash
# e2e/k8s/lib.sh — shared by the e2e/k8s scripts (sourced, not run). Everything here runs as
# root on a Vagrant node (node1 for the kubectl parts) with the working tree at /vagrant.

REPO=${MIGRATE_REPO:-/vagrant}
export KUBECONFIG=${KUBECONFIG:-/etc/kubernetes/admin.conf}
# The Rust toolchain provision-common.sh installs (rustup, outside any user's home so `sudo`
# finds it whatever HOME it passes on).
export RUSTUP_HOME=/opt/rust CARGO_HOME=/opt/rust
export PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Build output of the working tree lives in the VM, not in /vagrant/target: the host's
# target/ holds binaries for the host's glibc, and the shared folder is slow.
export CARGO_TARGET_DIR=/var/tmp/migrate-target
# The CA, and the operator's certificate the CLI uses (deploy/certs.sh), kept by root on node1.
CERTS_DIR=${MIGRATE_CERTS_DIR:-/root/.config/migrate/certs}
export MIGRATE_CERTS_DIR=$CERTS_DIR

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

need_root() { [[ $EUID -eq 0 ]] || die "run as root (sudo)"; }

# Builds the migrate CLI from the working tree (cargo is incremental: a no-op when nothing
# changed) and installs it as /usr/local/bin/migrate.
build_cli() {
    command -v cargo >/dev/null || die "cargo not found: provision-common.sh installs Rust in /opt/rust"
    log "cargo build --release -p cli (target dir $CARGO_TARGET_DIR)"
    (cd "$REPO" && cargo build --release --locked -p cli)
    install -m 0755 "$CARGO_TARGET_DIR/release/migrate" /usr/local/bin/migrate
}

# Approves the pending kubelet serving-certificate requests (serverTLSBootstrap: true makes
# every kubelet ask for one; until it is approved, kubectl exec/logs and the daemon's TLS check
# of the kubelet fail). Only CSRs of signer kubernetes.io/kubelet-serving made by a node
# (system:node:NAME) are approved: that is a lab shortcut for a two-VM cluster, a real
# cluster should check the requested names and addresses (or run an approver).
approve_serving_csrs() {
    local csr
    kubectl get csr -o go-template='{{range .items}}{{if and (eq .spec.signerName "kubernetes.io/kubelet-serving") (not .status.conditions)}}{{.metadata.name}} {{.spec.username}}{{"\n"}}{{end}}{{end}}' \
        | while read -r csr user; do
            [[ $user == system:node:* ]] || continue
            log "approving kubelet serving certificate $csr of $user"
            kubectl certificate approve "$csr" >/dev/null
        done
}

# Waits until node NAME has an approved kubelet serving certificate, approving as they come.
wait_serving_cert() {
    local node=$1 deadline=$((SECONDS + ${2:-300}))
    while ((SECONDS < deadline)); do
        approve_serving_csrs
        if kubectl get csr -o go-template='{{range .items}}{{if eq .spec.signerName "kubernetes.io/kubelet-serving"}}{{.spec.username}} {{range .status.conditions}}{{.type}}{{end}}{{"\n"}}{{end}}{{end}}' \
            | grep -qx "system:node:$node Approved"; then
            return 0
        fi
        sleep 3
    done
    die "node $node has no approved kubelet serving certificate after ${2:-300} s (kubectl get csr)"
}
