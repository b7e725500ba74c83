#!/usr/bin/env bash
# e2e/k8s/provision-common.sh NODE_IP — every node of the Vagrant cluster (run by the
# Vagrantfile as root on Debian 13 trixie). Idempotent: running it again changes nothing.
#
#  1. kernel modules (overlay, br_netfilter) and sysctls for pod networking; swap off
#  2. CRIU 4.2 from Debian sid, pinned so that only it (and the two libraries it needs newer
#     than trixie's) come from sid: the same recipe as lab/rootfs.sh. trixie's own CRIU 4.1.1
#     cannot dump TCP sockets on kernels >= 6.16 (trixie's kernel is 6.12, but backports
#     are newer); 4.2 works on both. /etc/criu/default.conf as in the lab.
#  3. CRI-O from the pkgs.k8s.io CRI-O repository, with enable_criu_support = true and
#     drop_infra_ctr = false (the seed's settings, as a drop-in), running trixie's crun
#     (built with CRIU support; the lab's runtime); kubeadm, kubelet, kubectl from pkgs.k8s.io
#  4. podman (builds the daemon image into the storage CRI-O uses) and the Rust toolchain
#     (rustup, in /opt/rust) to build the migrate CLI from /vagrant
#  5. the kubelet's node IP: the private network's address, not Vagrant's NAT one
#
# Versions: K8S_MINOR and CRIO_MINOR (default v1.32; ContainerCheckpoint is beta and on by
# default since v1.30, kubeadm.k8s.io/v1beta4 needs kubeadm >= v1.31).
set -euo pipefail

NODE_IP=${1:?usage: provision-common.sh NODE_IP}
K8S_MINOR=${K8S_MINOR:-v1.32}
CRIO_MINOR=${CRIO_MINOR:-v1.32}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DEBIAN_FRONTEND=noninteractive

log() { printf 'provision-common: %s\n' "$*" >&2; }
die() { printf 'provision-common: error: %s\n' "$*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "run as root"
# shellcheck source=/dev/null
. /etc/os-release
[[ ${VERSION_CODENAME:-} == trixie ]] \
    || die "this box is ${PRETTY_NAME:-unknown}; the scripts are written for Debian 13 (trixie)"

# ---- 1. kernel, sysctls, swap ----
log "kernel modules, sysctls, swap off"
printf 'overlay\nbr_netfilter\n' >/etc/modules-load.d/k8s.conf
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/90-k8s.conf <<'CONF'
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.ip_forward = 1
CONF
sysctl --system >/dev/null
swapoff -a
sed -i -E 's|^([^#].*[[:space:]]swap[[:space:]].*)$|#\1|' /etc/fstab
# systemd may activate swap from other units (zram, swap partitions found by the generator).
systemctl mask swap.target >/dev/null 2>&1 || true

# ---- apt sources: trixie (the box's), sid (only for CRIU), pkgs.k8s.io ----
apt-get update -qq
apt-get install -y -qq curl gpg ca-certificates apt-transport-https >/dev/null
install -d -m 0755 /etc/apt/keyrings
cat >/etc/apt/sources.list.d/sid.sources <<CONF
Types: deb
URIs: $MIRROR
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no
CONF
# Same pinning as lab/rootfs.sh: sid low, only CRIU's packages (and the two libraries it needs
# newer than trixie's) high. Installing "criu/sid" instead would take every dependency from sid.
cat >/etc/apt/preferences.d/sid-criu <<'CONF'
Package: *
Pin: release n=sid
Pin-Priority: 100

Package: criu libcriu2 libcompel1 libnl-3-200 libnet9
Pin: release n=sid
Pin-Priority: 990
CONF
curl -fsSL "https://pkgs.k8s.io/core:/stable:/$K8S_MINOR/deb/Release.key" \
    | gpg --batch --yes --dearmor -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/$K8S_MINOR/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
curl -fsSL "https://pkgs.k8s.io/addons:/cri-o:/stable:/$CRIO_MINOR/deb/Release.key" \
    | gpg --batch --yes --dearmor -o /etc/apt/keyrings/cri-o-apt-keyring.gpg
echo "deb [signed-by=/etc/apt/keyrings/cri-o-apt-keyring.gpg] https://pkgs.k8s.io/addons:/cri-o:/stable:/$CRIO_MINOR/deb/ /" \
    >/etc/apt/sources.list.d/cri-o.list
apt-get update -qq

# ---- 2.-4. packages ----
# cri-o's package ships some of the files Debian's containers-common (a podman dependency)
# ships too (/etc/containers/policy.json, registries.conf): with both, dpkg refuses to
# overwrite them (cri-o/packaging issues 3 and 68). They hold equivalent defaults, so let the
# later package's copy win.
log "apt-get install: cri-o kubelet kubeadm kubectl criu podman crun (a few minutes)"
apt-get install -y -q -o Dpkg::Options::=--force-overwrite \
    cri-o kubelet kubeadm kubectl cri-tools \
    criu libcriu2 libcompel1 \
    podman crun conmon catatonit \
    git build-essential pkg-config jq >/dev/null
apt-mark hold kubelet kubeadm kubectl cri-o >/dev/null
criu_version=$(dpkg-query -W -f='${Version}' criu)
[[ $criu_version == 4.[2-9]* || $criu_version == [5-9].* ]] \
    || die "criu is $criu_version, want >= 4.2 (from sid; see /etc/apt/preferences.d/sid-criu)"
log "criu $criu_version, $(crun --version | head -n 1), $(crio --version 2>/dev/null | awk '/^Version/ {print "cri-o " $2}')"
crun --version | grep -q '+CRIU' || die "this crun was built without CRIU support"

# The same CRIU options as the lab nodes (lab/rootfs.sh): containers with client connections
# open or arriving can be checkpointed; restored connections come back closed.
install -d -m 0755 /etc/criu
cat >/etc/criu/default.conf <<'CONF'
# Written by migrate e2e/k8s/provision-common.sh (as lab/rootfs.sh does for the lab).
skip-in-flight
tcp-established
tcp-close
CONF

# One storage for podman, CRI-O and the daemon's podman (which reads this file from the host's
# /etc/containers): the daemon image built here and checkpoint images the daemon loads are
# what CRI-O sees.
cat >/etc/containers/storage.conf <<'CONF'
# Written by migrate e2e/k8s/provision-common.sh: shared by CRI-O and podman.
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF

# ---- CRI-O: the seed's two settings, and trixie's crun (with CRIU) as the runtime ----
install -d -m 0755 /etc/crio/crio.conf.d
cat >/etc/crio/crio.conf.d/50-migrate.conf <<'CONF'
# Written by migrate e2e/k8s/provision-common.sh.
[crio]
storage_driver = "overlay"

[crio.runtime]
# Checkpoint/restore through CRIU (kubelet ContainerCheckpoint, restore from checkpoint images).
enable_criu_support = true
# Keep the infra (pause) container: checkpointed containers join its namespaces.
drop_infra_ctr = false
default_runtime = "crun"

[crio.runtime.runtimes.crun]
# Debian's crun 1.21, built with CRIU support and tried with CRIU 4.2 in the lab.
runtime_path = "/usr/bin/crun"
runtime_type = "oci"
runtime_root = "/run/crun"
monitor_path = "/usr/bin/conmon"
CONF
# CRI-O's package installs a bridge CNI config; flannel's (provision-control-plane.sh) is
# the pod network here.
rm -f /etc/cni/net.d/*crio*bridge*.conflist /etc/cni/net.d/*crio-bridge*.conf
systemctl enable crio >/dev/null 2>&1
systemctl restart crio

# ---- 5. the kubelet's node IP (the private network, not the NAT interface) ----
echo "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" >/etc/default/kubelet
systemctl enable kubelet >/dev/null 2>&1

# ---- Rust (rustup: the workspace needs a newer rustc than trixie's) ----
export RUSTUP_HOME=/opt/rust CARGO_HOME=/opt/rust
if [[ ! -x /opt/rust/bin/cargo ]]; then
    log "installing Rust (rustup, minimal profile) in /opt/rust"
    curl -fsSL https://sh.rustup.rs | sh -s -- -y --no-modify-path --profile minimal --default-toolchain stable >/dev/null
fi
/opt/rust/bin/rustup update stable >/dev/null 2>&1 || true
cat >/etc/profile.d/rust.sh <<'CONF'
export RUSTUP_HOME=/opt/rust CARGO_HOME=/opt/rust
export PATH=/opt/rust/bin:$PATH
CONF
log "done: $(hostname) at $NODE_IP"
