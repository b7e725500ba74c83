#!/usr/bin/env bash
# e2e/k8s/provision-worker.sh — node2 (after provision-common.sh): joins the cluster with the
# command node1 wrote to /vagrant/.vagrant-join.sh. Its kubelet serving certificate is approved
# from node1 afterwards (finish-cluster.sh, which the Vagrantfile runs on node1 once node2 is
# up, and again at the start of migrate-nginx.sh): node2 holds no cluster credentials.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$HERE/lib.sh"
need_root
JOIN_FILE=$REPO/.vagrant-join.sh

if [[ -f /etc/kubernetes/kubelet.conf ]]; then
    log "already joined"
    exit 0
fi
# node1 writes it at the end of its provisioning; providers that bring VMs up in parallel
# (libvirt) get here first.
wait_s=${JOIN_WAIT:-1800}
deadline=$((SECONDS + wait_s))
until [[ -s $JOIN_FILE ]]; do
    ((SECONDS < deadline)) || die "$JOIN_FILE did not appear within $wait_s s: provision node1 first (vagrant up node1)"
    sleep 5
done
log "kubeadm join"
bash "$JOIN_FILE" >&2
systemctl is-active --quiet kubelet || die "the kubelet is not running after the join (journalctl -u kubelet)"
log "joined; node1 approves this kubelet's serving certificate (finish-cluster.sh)"
