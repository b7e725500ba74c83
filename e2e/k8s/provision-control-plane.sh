#!/usr/bin/env bash
# e2e/k8s/provision-control-plane.sh NODE_IP — node1 (after provision-common.sh): kubeadm init,
# pod network (flannel), control-plane taint removed, join command for node2, node1's kubelet
# serving certificate approved. Idempotent: an initialised node is left as it is.
#
# kubeadm configuration:
#   - KubeletConfiguration featureGates ContainerCheckpoint: true. On by default since v1.30
#     (beta), set explicitly so that the kubelet's /checkpoint endpoint answers (404 without).
#     The kubelet configuration is stored in the cluster (ConfigMap kubelet-config) and used by
#     every node that joins, so node2 gets the same.
#   - serverTLSBootstrap: true: each kubelet gets its serving certificate from the cluster CA
#     (a CSR approved below) instead of a self-signed one, so the migrate daemon can verify its
#     node's kubelet with the ServiceAccount's ca.crt.
#   - podSubnet 10.244.0.0/16 (flannel's default), API server on the private network.
#
# CNI: flannel (its release manifest, FLANNEL_MANIFEST to override), VXLAN over the private
# network (192.168.56.0/24, chosen with --iface-regex: eth0 is Vagrant's NAT, the same
# 10.0.2.15 on every VM). Flannel needs no configuration beyond the pod CIDR, and it is the
# seed's choice.
set -euo pipefail

NODE_IP=${1:?usage: provision-control-plane.sh NODE_IP}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$HERE/lib.sh"
need_root
FLANNEL_MANIFEST=${FLANNEL_MANIFEST:-https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml}
JOIN_FILE=$REPO/.vagrant-join.sh

if [[ ! -f /etc/kubernetes/admin.conf ]]; then
    version=$(kubeadm version -o short)
    log "kubeadm init (Kubernetes $version)"
    cat >/root/kubeadm-config.yaml <<CONF
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: $NODE_IP
  bindPort: 6443
nodeRegistration:
  name: $(hostname)
  criSocket: unix:///var/run/crio/crio.sock
  kubeletExtraArgs:
    - name: node-ip
      value: $NODE_IP
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: $version
controlPlaneEndpoint: $NODE_IP:6443
networking:
  podSubnet: 10.244.0.0/16
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
serverTLSBootstrap: true
featureGates:
  ContainerCheckpoint: true
CONF
    kubeadm config images pull --config /root/kubeadm-config.yaml >/dev/null
    kubeadm init --config /root/kubeadm-config.yaml | tee /root/kubeadm-init.log >&2
fi
install -d -m 0700 /root/.kube
install -m 0600 /etc/kubernetes/admin.conf /root/.kube/config
if [[ -d /home/vagrant ]]; then
    install -d -o vagrant -g vagrant -m 0700 /home/vagrant/.kube
    install -o vagrant -g vagrant -m 0600 /etc/kubernetes/admin.conf /home/vagrant/.kube/config
fi

log "waiting for the API server"
deadline=$((SECONDS + 300))
until kubectl get --raw /readyz >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the API server is not ready after 300 s (journalctl -u kubelet)"
    sleep 2
done

# Workloads (the e2e nginx Pod, the daemon) run on node1 too.
kubectl taint nodes "$(hostname)" node-role.kubernetes.io/control-plane:NoSchedule- >/dev/null 2>&1 || true

if ! kubectl get namespace kube-flannel >/dev/null 2>&1; then
    log "flannel: $FLANNEL_MANIFEST"
    kubectl apply -f "$FLANNEL_MANIFEST" >&2
    # flanneld picks the interface whose name or address matches: 192\.168\.56\. here.
    regex="^$(cut -d. -f1-3 <<<"$NODE_IP" | sed 's/\./\\./g')\\."
    patch=$(jq -cn --arg arg "--iface-regex=$regex" \
        '[{op: "add", path: "/spec/template/spec/containers/0/args/-", value: $arg}]')
    kubectl -n kube-flannel patch daemonset kube-flannel-ds --type=json -p "$patch" >&2
fi

# node1's kubelet asked for its serving certificate when it started.
wait_serving_cert "$(hostname)" 300
kubectl wait --for=condition=Ready "node/$(hostname)" --timeout=300s >&2

# The join command for node2 (a new token each run; tokens live 24 h).
umask 077
kubeadm token create --print-join-command \
    | sed 's|$| --cri-socket unix:///var/run/crio/crio.sock|' >"$JOIN_FILE.tmp"
mv "$JOIN_FILE.tmp" "$JOIN_FILE"
log "join command written to $JOIN_FILE"
