#!/usr/bin/env bash
# lab/enter.sh [OPTIONS] ROOTFS NODE_DIR -- CMD [ARGS...]
#
# Runs CMD as a lab "node": inside the shared root filesystem ROOTFS (built by lab/rootfs.sh),
# in its own mount, UTS, IPC, cgroup and (by default) PID namespace and its own cgroups,
# optionally inside an existing network namespace. Node state lives in NODE_DIR on the host:
#   NODE_DIR/containers  -> /var/lib/containers  (podman storage, private to the node)
#   NODE_DIR/var-tmp     -> /var/tmp             (podman's scratch space for import/export)
#   NODE_DIR/node.pid    <- "PID STARTTIME" of CMD as the host sees it (for lab/exec.sh)
#   NODE_DIR/node.cgroup <- the node's cgroup directories on the host (for lab/stop.sh)
# and /run, /tmp, /dev/shm are fresh tmpfs (podman's runroot and its SHM lock file are private).
#
# The mount setup (tried on kernel 6.18, cgroup v1 host; see shared/ENVIRONMENT.md):
#   unshare -m -u -i [-p] --fork; mount --make-rprivate /; bind ROOTFS onto itself; fresh proc
#   and sysfs; a tmpfs /dev with the basic device nodes bound from the host, a new devpts
#   instance, tmpfs /dev/shm, mqueue; cgroups: a tmpfs at /sys/fs/cgroup with every host v1
#   hierarchy mounted (no cgroup2 "unified": crun refuses hybrid mode); then pivot_root and
#   exec CMD with a clean environment.
#
# Cgroups are per node: before unsharing, the node moves itself into a new cgroup
# <its current cgroup>/migrate-lab/<netns, else hostname> in every v1 hierarchy (nested where the caller is,
# so limits and accounting set up by whoever runs the lab still apply), then takes a cgroup
# namespace (unshare -C) rooted there and mounts each v1 hierarchy afresh, so inside the node
# that cgroup is "/" (NODE_DIR/node.cgroup lists them). Podman's /libpod_parent/libpod-<ID> then lands in the node's own subtree. Without
# this, two nodes share /libpod_parent/libpod-<ID> on the host: a container restored on node B
# with the ID it had on node A (the default) joins A's cgroup if A's copy still runs (pre-copy
# checkpoints use --leave-running), and freezing, killing or removing one hits the other.
# lab/stop.sh kills a node and removes that subtree.
# The root is read-only inside the node (so nodes cannot change each other's files) unless --rw.
#
# With the PID namespace (default), CMD is PID 1 of the node: when it exits, every process of
# the node (podman's conmon, containers) is killed and the node's mounts go away. So run a
# long-lived init as CMD (e.g. `catatonit -P`, or the node daemon) and use lab/exec.sh to run
# commands in the node. Killing the PID that NODE_DIR/node.pid names tears the node down.
#
# Options:
#   --netns NAME        run in the network namespace /run/netns/NAME (from `ip netns add`)
#   --hostname NAME     the node's hostname (default: basename of NODE_DIR)
#   --bind SRC:DST      bind-mount host path SRC at DST in the node (repeatable; DST is created
#                       in ROOTFS if missing)
#   --env K=V           set an environment variable for CMD (repeatable)
#   --no-pidns          share the host PID namespace (CMD is not PID 1)
#   --rw                leave the shared root writable inside the node
set -euo pipefail

die() { echo "enter.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

SELF=$(readlink -f "$0")
PATH_IN_NODE=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# ---------------------------------------------------------------------------------------------
# Stage 2: runs inside the new namespaces (still seeing the host's files), sets up the root,
# pivots into it and execs CMD.
# ---------------------------------------------------------------------------------------------
if [[ ${1:-} == __inner ]]; then
    shift
    trap 'echo "enter.sh: error: node setup failed (line $LINENO): $BASH_COMMAND" >&2' ERR
    R=$1 NODE_DIR=$2 NAME=$3 RW=$4; shift 4
    nb=$1; shift; binds=("${@:1:$nb}"); shift "$nb"
    ne=$1; shift; envs=("${@:1:$ne}"); shift "$ne"
    [[ ${1:-} == -- ]] && shift

    # The host's /proc is still mounted here: /proc/self is this shell as the host sees it.
    read -r -a stat </proc/self/stat
    echo "${stat[0]} ${stat[21]}" >"$NODE_DIR/node.pid.tmp"

    mount --make-rprivate /
    hostname "$NAME"

    mount --bind "$R" "$R"
    mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
    mount -t sysfs -o nosuid,nodev,noexec sysfs "$R/sys"

    # cgroups: fresh v1 mounts made inside the node's cgroup namespace are rooted at the node's
    # own cgroup (see the header). "unified" (cgroup2) is left out: crun refuses hybrid mode.
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec,size=64k cgroup "$R/sys/fs/cgroup"
    while read -r t opts; do
        opts=$(tr ',' '\n' <<<"$opts" | { grep -vx 'rw\|ro' || true; } | paste -sd, -)
        [[ $opts == name=* ]] && opts=none,$opts
        mkdir -p "$R$t"
        mount -t cgroup -o "nosuid,nodev,noexec,$opts" cgroup "$R$t"
    done < <(findmnt -rn -t cgroup -o TARGET,FS-OPTIONS | grep '^/sys/fs/cgroup/')

    # /dev: a small tmpfs, not the host's /dev (a shared /dev/shm would share podman's lock file)
    mount -t tmpfs -o mode=755,nosuid,size=1m dev "$R/dev"
    for n in null zero full random urandom tty net/tun fuse; do
        [[ -c /dev/$n ]] || continue
        mkdir -p "$(dirname "$R/dev/$n")"
        touch "$R/dev/$n"
        mount --bind "/dev/$n" "$R/dev/$n"
    done
    mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$R/dev/pts"
    ln -s pts/ptmx "$R/dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
    mount -t mqueue -o nosuid,nodev,noexec mqueue "$R/dev/mqueue"
    ln -s /proc/self/fd "$R/dev/fd"
    ln -s /proc/self/fd/0 "$R/dev/stdin"
    ln -s /proc/self/fd/1 "$R/dev/stdout"
    ln -s /proc/self/fd/2 "$R/dev/stderr"

    mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
    mount -t tmpfs -o mode=755,nosuid,nodev run "$R/run"
    mkdir -p "$R/run/lock"

    mkdir -p "$NODE_DIR/containers" "$NODE_DIR/var-tmp"
    chmod 1777 "$NODE_DIR/var-tmp"
    mount --bind "$NODE_DIR/containers" "$R/var/lib/containers"
    mount --bind "$NODE_DIR/var-tmp" "$R/var/tmp"

    for b in "${binds[@]}"; do
        src=${b%%:*} dst=${b#*:}
        if [[ ! -e $R$dst ]]; then
            if [[ -d $src ]]; then mkdir -p "$R$dst"; else mkdir -p "$(dirname "$R$dst")"; touch "$R$dst"; fi
        fi
        mount --rbind "$src" "$R$dst"
    done

    [[ $RW == 1 ]] || mount -o remount,bind,ro "$R"

    mv "$NODE_DIR/node.pid.tmp" "$NODE_DIR/node.pid"

    cd "$R"
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot

    exec /usr/bin/env -i PATH="$PATH_IN_NODE" HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
        HOSTNAME="$NAME" PODMAN_IGNORE_CGROUPSV1_WARNING=1 "${envs[@]}" "$@"
fi

# ---------------------------------------------------------------------------------------------
# Stage 1: parse arguments, check them, create the namespaces.
# ---------------------------------------------------------------------------------------------
NETNS="" NAME="" PIDNS=1 RW=0
binds=() envs=()
while (($#)); do
    case $1 in
        --netns) NETNS=${2:?--netns needs a name}; shift 2 ;;
        --hostname) NAME=${2:?--hostname needs a name}; shift 2 ;;
        --bind) [[ ${2:-} == /*:/* ]] || die "--bind wants SRC:DST with absolute paths, got '${2:-}'"
                binds+=("$2"); shift 2 ;;
        --env) [[ ${2:-} == *=* ]] || die "--env wants K=V, got '${2:-}'"
               envs+=("$2"); shift 2 ;;
        --no-pidns) PIDNS=0; shift ;;
        --rw) RW=1; shift ;;
        -h|--help) usage ;;
        --) break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
(($# >= 2)) || usage
ROOTFS=$1 NODE_DIR=$2; shift 2
[[ ${1:-} == -- ]] && shift
(($#)) || die "no command given: enter.sh ROOTFS NODE_DIR -- CMD..."

[[ $EUID -eq 0 ]] || die "must run as root (namespaces, mounts)"
ROOTFS=$(readlink -f "$ROOTFS")
[[ -x $ROOTFS/usr/bin/podman && -f $ROOTFS/etc/migrate-lab/stamp ]] \
    || die "$ROOTFS is not a lab root filesystem (build it with lab/rootfs.sh)"
[[ -d $ROOTFS/.oldroot ]] || die "$ROOTFS/.oldroot is missing (rebuild with lab/rootfs.sh)"
mkdir -p "$NODE_DIR"
NODE_DIR=$(readlink -f "$NODE_DIR")
[[ $NODE_DIR != "$ROOTFS"* ]] || die "NODE_DIR must not be inside ROOTFS"
: "${NAME:=$(basename "$NODE_DIR")}"
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]] || die "bad node name '$NAME' (letters, digits, _ . -)"
for b in "${binds[@]}"; do
    [[ -e ${b%%:*} ]] || die "--bind source ${b%%:*} does not exist"
done
if [[ -f $NODE_DIR/node.pid ]]; then
    read -r oldpid oldstart <"$NODE_DIR/node.pid" || true
    if [[ -n ${oldpid:-} && -r /proc/$oldpid/stat ]]; then
        read -r -a st </proc/"$oldpid"/stat
        [[ ${st[21]} != "${oldstart:-}" ]] || die "node $NODE_DIR is already running (pid $oldpid)"
    fi
    rm -f "$NODE_DIR/node.pid"
fi

# Per-node cgroups (v1 hosts; see the header): move this process, and so everything the node
# runs, into CURRENT/migrate-lab/NETNS (or NAME) in every hierarchy, then unshare the cgroup namespace there.
# The hybrid layout's cgroup2 tree (/sys/fs/cgroup/unified, no controllers) is not mounted in the
# node, but CRIU restores a process's cgroup2 path too: the node must be rooted there as well,
# or restored containers leave /libpod_parent/libpod-<ID> behind in the host's unified tree.
v1=0
# The leaf is the network namespace's name when there is one: unique per lab (it carries the
# lab's prefix), so two labs with the same node names never share a cgroup.
CGNAME=${NETNS:-$NAME}
# Written as we go, so that lab/stop.sh can remove what a failed start created.
: >"$NODE_DIR/node.cgroup"
while read -r t type opts; do
    opts=$(tr ',' '\n' <<<"$opts" | { grep -vx 'rw\|ro' || true; } | paste -sd, -)
    # This process's cgroup in that hierarchy: the /proc/self/cgroup line naming the same
    # controllers (the cgroup2 line is "0::PATH").
    if [[ $type == cgroup2 ]]; then
        cur=$(awk -F: '$1 == 0 { print $3 }' /proc/self/cgroup)
    else
        cur=$(awk -F: -v c="$opts" '$2 == c { print $3 }' /proc/self/cgroup)
    fi
    [[ $cur == /* ]] || die "cannot find this process's cgroup for hierarchy $t ($opts)"
    cur=${cur%/}
    [[ $cur == */migrate-lab/* ]] && die "already inside a lab node's cgroup ($t$cur): run from the host"
    for d in "$t$cur/migrate-lab" "$t$cur/migrate-lab/$CGNAME"; do
        mkdir -p "$d" || die "cannot create cgroup $d"
        # A new v1 cpuset cgroup has no CPUs or memory nodes: copy the parent's.
        if [[ -f $d/cpuset.cpus && -z $(<"$d/cpuset.cpus") ]]; then
            cat "$(dirname "$d")/cpuset.cpus" >"$d/cpuset.cpus"
            cat "$(dirname "$d")/cpuset.mems" >"$d/cpuset.mems"
        fi
    done
    echo "$t$cur/migrate-lab/$CGNAME" >>"$NODE_DIR/node.cgroup"
    echo $$ >"$t$cur/migrate-lab/$CGNAME/cgroup.procs" || die "cannot move into cgroup $t$cur/migrate-lab/$CGNAME"
    if [[ $type == cgroup ]]; then v1=$((v1 + 1)); fi
done < <(findmnt -rn -t cgroup,cgroup2 -o TARGET,FSTYPE,FS-OPTIONS | grep '^/sys/fs/cgroup/')
((v1)) || die "no cgroup v1 hierarchy under /sys/fs/cgroup: only the cgroup v1 (hybrid) \
layout of this machine kind is supported (a pure cgroup2 host needs another arrangement)"

ns_args=(--mount --uts --ipc --cgroup --fork --propagation private)
((PIDNS)) && ns_args+=(--pid)
prefix=()
if [[ -n $NETNS ]]; then
    [[ -e /run/netns/$NETNS ]] || die "network namespace '$NETNS' not found (ip netns add $NETNS)"
    # Not `ip netns exec`: it remounts /sys, which hides the host's cgroup mounts we bind.
    prefix=(nsenter --net="/run/netns/$NETNS" --)
fi

exec "${prefix[@]}" unshare "${ns_args[@]}" -- /bin/bash "$SELF" __inner \
    "$ROOTFS" "$NODE_DIR" "$NAME" "$RW" "${#binds[@]}" "${binds[@]}" "${#envs[@]}" "${envs[@]}" -- "$@"
