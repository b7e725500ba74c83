#!/usr/bin/env bash
# lab/rootfs.sh [DIR] — builds the lab's shared Debian trixie root filesystem at DIR
# (default /var/lib/migrate-lab/rootfs), once, and caches it.
#
# The root holds podman, crun, conmon, catatonit, busybox-static, iproute2, procps,
# ca-certificates, nginx and redis-server from trixie, and criu + libcriu2 + libcompel1 4.2.x
# from sid, with the two libraries sid's criu needs newer than trixie has (libnl-3-200, libnet9);
# nothing else comes from sid (checked). CRIU < 4.2 cannot dump TCP sockets on kernels >= 6.16;
# 4.x needs glibc >= 2.38, so it cannot run on the bookworm host. Podman inside is configured for the lab: cgroupfs, file
# events, k8s-file logs, host network by default, overlay storage.
#
# Caching: DIR/etc/migrate-lab/stamp records a hash of this script's recipe (package lists,
# config files, RECIPE_VERSION). When it matches, the script does nothing. When it differs (or
# DIR holds no stamp), the root is rebuilt in DIR.build and swapped in. Set
# MIGRATE_LAB_REBUILD=1 to force a rebuild. The Debian mirror is the one the host's apt uses;
# MIGRATE_LAB_MIRROR overrides it.
#
# Host side effects: installs debootstrap with apt-get when missing, and writes DIR, DIR.build,
# DIR.old. Every mount made during the build lives in a private mount namespace (unshare -m) and
# goes away with it; services are kept from starting inside the chroot (policy-rc.d).
set -euo pipefail

DIR=${1:-/var/lib/migrate-lab/rootfs}
# The Debian mirror the host's apt already uses (deb822 or one-line sources), unless overridden.
host_mirror() {
    local uri
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    if [[ -z $uri ]]; then
        uri=$(awk '$1 == "deb" && $2 !~ /security/ && $2 ~ /debian/ { print $2; exit }' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1)
    fi
    [[ -n $uri ]] || { echo "no Debian mirror found in the host's apt sources: set MIGRATE_LAB_MIRROR" >&2; exit 1; }
    echo "$uri"
}
MIRROR=${MIGRATE_LAB_MIRROR:-$(host_mirror)}
SUITE=trixie

# ---- the recipe: anything below this line up to "end of recipe" goes into the stamp hash ----
RECIPE_VERSION=3
PACKAGES=(
    podman crun conmon catatonit netavark
    busybox-static iproute2 procps ca-certificates
    nginx redis-server redis-tools
)
SID_PACKAGES=(criu libcriu2 libcompel1)
SID_VERSION_PREFIX=4.2.
# What criu 4.2.1 from sid needs that trixie lacks: libnl-3-200 >= 3.11.0 (trixie has 3.7.0) and
# libnet9 (trixie has only libnet1). Nothing else comes from sid; the build checks that.
SID_DEPS=(libnl-3-200 libnet9)

read -r -d '' CONTAINERS_CONF <<'EOF' || true
# Written by migrate lab/rootfs.sh. Podman inside a lab node (cgroup v1, no systemd, no registry).
[containers]
# Nodes have their own network namespace; containers share it (no netavark bridge, no CNI).
netns = "host"
log_driver = "k8s-file"
cgroupns = "host"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
# No registry is reachable: a missing image is an error at once, not a pull that fails on DNS.
pull_policy = "never"
EOF

read -r -d '' STORAGE_CONF <<'EOF' || true
# Written by migrate lab/rootfs.sh. /var/lib/containers is bind-mounted per node by lab/enter.sh,
# /run is a per-node tmpfs: nothing here is shared between nodes.
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"

[storage.options.overlay]
mountopt = "nodev"
EOF

read -r -d '' REGISTRIES_CONF <<'EOF' || true
# Written by migrate lab/rootfs.sh: no registry is reachable; images are local (localhost/lab/...).
unqualified-search-registries = []
EOF
# CRIU options for every checkpoint and restore. CRIU reads /etc/criu/default.conf also when
# crun drives it over RPC (crun 1.21 passes no config file of its own; Podman 5.4 has no flag
# for these). A container serving clients has connections open or arriving while it freezes:
# skip-in-flight drops the half-open ones (the client retries), tcp-established dumps the open
# ones and tcp-close restores them closed (the destination has another address: clients see a
# reset and reconnect). Without them such a dump fails.
read -r -d '' CRIU_CONF <<'EOF' || true
# Written by migrate lab/rootfs.sh.
skip-in-flight
tcp-established
tcp-close
EOF
# ---- end of recipe ----

die() { echo "rootfs.sh: error: $*" >&2; exit 1; }
log() { printf 'rootfs.sh: %s\n' "$*" >&2; }

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot, mount namespaces)"
[[ $DIR == /* ]] || die "DIR must be an absolute path, got '$DIR'"
[[ $DIR != / ]] || die "refusing to use / as DIR"

recipe_hash() {
    {
        echo "$RECIPE_VERSION|$SUITE"
        printf '%s\n' "${PACKAGES[@]}" -- "${SID_PACKAGES[@]}" -- "${SID_DEPS[@]}" -- "$SID_VERSION_PREFIX"
        printf '%s\n' "$CONTAINERS_CONF" "$STORAGE_CONF" "$REGISTRIES_CONF" "$CRIU_CONF"
    } | sha256sum | cut -d' ' -f1
}
HASH=$(recipe_hash)
STAMP=$DIR/etc/migrate-lab/stamp

if [[ ${MIGRATE_LAB_REBUILD:-0} != 1 && -f $STAMP ]] && grep -qx "recipe=$HASH" "$STAMP"; then
    log "up to date: $DIR (recipe $HASH)"
    exit 0
fi

# Processes whose root is DIR (lab nodes after pivot_root) would lose their files under them.
# Their /proc/PID/root has DIR's device and inode even from another mount namespace.
root_in_use() {
    local want pid
    [[ -d $1 ]] || return 1
    want=$(stat -Lc '%d:%i' "$1")
    for pid in /proc/[0-9]*; do
        [[ $(stat -Lc '%d:%i' "$pid/root" 2>/dev/null) == "$want" ]] && { echo "${pid#/proc/}"; return 0; }
    done
    return 1
}
if pid=$(root_in_use "$DIR"); then
    die "$DIR is in use by process $pid (a lab node?): stop the lab before rebuilding the root"
fi

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap on the host (apt-get)"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
        || die "apt-get install debootstrap failed"
fi
for tool in unshare chroot mount sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found on the host"
done

BUILD=$DIR.build
OLD=$DIR.old
start=$(date +%s)
mkdir -p "$(dirname "$DIR")"
# A leftover from an interrupted build: no mounts can be in it (they lived in a namespace).
if [[ -e $BUILD ]]; then
    log "removing leftover $BUILD"
    rm -rf --one-file-system "$BUILD"
fi

log "debootstrap --variant=minbase $SUITE $BUILD $MIRROR (about a minute)"
if ! debootstrap --variant=minbase "$SUITE" "$BUILD" "$MIRROR" >"$DIR.debootstrap.log" 2>&1; then
    tail -20 "$DIR.debootstrap.log" >&2
    die "debootstrap failed (full log: $DIR.debootstrap.log; $BUILD/debootstrap/debootstrap.log)"
fi

# ---- apt configuration inside the root ----
rm -f "$BUILD/etc/apt/sources.list"
cat >"$BUILD/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# The sid Release file on the mirror can be past its Valid-Until date.
cat >"$BUILD/etc/apt/sources.list.d/sid.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no
EOF
# Pin sid low, and only the CRIU packages (and the one library they need newer than trixie's)
# high. Naming them "pkg/sid" instead would make apt take *every* dependency from sid too.
cat >"$BUILD/etc/apt/preferences.d/sid" <<EOF
Package: *
Pin: release n=sid
Pin-Priority: 100

Package: ${SID_PACKAGES[*]} ${SID_DEPS[*]}
Pin: release n=sid
Pin-Priority: 990
EOF
cat >"$BUILD/etc/apt/apt.conf.d/90migrate-lab" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dpkg::Options { "--force-confdef"; "--force-confold"; };
EOF
# No service may start inside the chroot (nginx, redis postinst scripts).
cat >"$BUILD/usr/sbin/policy-rc.d" <<'EOF'
#!/bin/sh
exit 101
EOF
chmod 755 "$BUILD/usr/sbin/policy-rc.d"

log "apt-get install (trixie): ${PACKAGES[*]}; (sid, pinned): ${SID_PACKAGES[*]} ${SID_DEPS[*]}"
# All mounts for the chroot live in this private mount namespace and vanish with it.
if ! unshare -m --propagation private bash -euo pipefail -c '
    R=$1; shift
    mount -t proc proc "$R/proc"
    mount -t sysfs sysfs "$R/sys"
    mount --rbind /dev "$R/dev"
    cp -L /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
    run() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
    n=$1; shift
    pkgs=("${@:1:$n}"); shift "$n"
    run apt-get update -qq
    run apt-get install -y -q "${pkgs[@]}" "$@"
    run apt-get clean
' _ "$BUILD" "${#PACKAGES[@]}" "${PACKAGES[@]}" "${SID_PACKAGES[@]}" "${SID_DEPS[@]}" >"$DIR.apt.log" 2>&1; then
    tail -30 "$DIR.apt.log" >&2
    die "apt-get inside the root failed (full log: $DIR.apt.log)"
fi

# ---- checks: versions, and nothing but the three CRIU packages from sid ----
ver() { chroot "$BUILD" dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }
for p in "${SID_PACKAGES[@]}"; do
    v=$(ver "$p") || die "$p is not installed in the root"
    [[ $v == "$SID_VERSION_PREFIX"* ]] || die "$p is $v in the root, want $SID_VERSION_PREFIX*"
done
from_sid=$(chroot "$BUILD" /usr/bin/env -i PATH=/usr/bin:/bin LC_ALL=C apt list --installed 2>/dev/null \
    | awk -F/ '/\/unstable[ ,]/{print $1}' | sort | tr '\n' ' ')
want_sid=$(printf '%s\n' "${SID_PACKAGES[@]}" "${SID_DEPS[@]}" | sort | tr '\n' ' ')
[[ $from_sid == "$want_sid" ]] || die "packages from sid are '$from_sid', want exactly '$want_sid'"
chroot "$BUILD" criu --version >/dev/null || die "criu does not run in the root"

# ---- lab configuration ----
mkdir -p "$BUILD/etc/containers/registries.conf.d" "$BUILD/etc/migrate-lab"
printf '%s\n' "$CONTAINERS_CONF" >"$BUILD/etc/containers/containers.conf"
printf '%s\n' "$STORAGE_CONF" >"$BUILD/etc/containers/storage.conf"
printf '%s\n' "$REGISTRIES_CONF" >"$BUILD/etc/containers/registries.conf.d/99-migrate-lab.conf"
mkdir -p "$BUILD/etc/criu"
printf '%s\n' "$CRIU_CONF" >"$BUILD/etc/criu/default.conf"
# Mount points used by lab/enter.sh (the root is read-only inside nodes).
mkdir -p "$BUILD/var/lib/containers" "$BUILD/shared" "$BUILD/lab" "$BUILD/.oldroot"
echo "migrate-lab" >"$BUILD/etc/hostname"
# resolv.conf stays as copied from the host; lab nodes have no route outside anyway.
rm -rf "$BUILD/var/lib/apt/lists/"* "$BUILD/var/cache/apt/"*.bin

versions=$(for p in podman crun conmon criu busybox-static nginx redis-server; do
    printf '%s=%s ' "$p" "$(ver "$p")"; done)
end=$(date +%s)
{
    echo "recipe=$HASH"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "seconds=$((end - start))"
    echo "versions=$versions"
} >"$BUILD/etc/migrate-lab/stamp"

# ---- swap in ----
if [[ -e $DIR ]]; then
    if pid=$(root_in_use "$DIR"); then
        die "$DIR came into use by process $pid during the build; new root left at $BUILD"
    fi
    rm -rf --one-file-system "$OLD"
    mv "$DIR" "$OLD"
fi
mv "$BUILD" "$DIR"
rm -rf --one-file-system "$OLD"
log "built $DIR in $((end - start)) s: $versions"
