#!/usr/bin/env bash
# lab/exec.sh NODE_DIR -- CMD [ARGS...]
#
# Runs CMD inside a running lab node (started by lab/enter.sh with the same NODE_DIR): joins
# the node's cgroups, its mount, UTS, IPC, network, PID and cgroup namespaces and its root, with the same
# clean environment enter.sh gives the node's init. Standard input/output are passed through,
# and the exit status is CMD's. NODE_DIR/node.pid holds "PID STARTTIME": the start time guards
# against a recycled PID after the node died.
set -euo pipefail

die() { echo "exec.sh: error: $*" >&2; exit 1; }
(($# >= 1)) || die "usage: exec.sh NODE_DIR -- CMD [ARGS...]"
NODE_DIR=$1; shift
[[ ${1:-} == -- ]] && shift
(($#)) || die "no command given: exec.sh NODE_DIR -- CMD..."
[[ $EUID -eq 0 ]] || die "must run as root (nsenter)"
[[ -f $NODE_DIR/node.pid ]] || die "$NODE_DIR/node.pid not found: is the node running? (lab/enter.sh)"
read -r pid start <"$NODE_DIR/node.pid" || die "cannot read $NODE_DIR/node.pid"
[[ -r /proc/$pid/stat ]] || die "node $NODE_DIR is not running (pid $pid is gone)"
read -r -a st </proc/"$pid"/stat
[[ ${st[21]} == "$start" ]] || die "node $NODE_DIR is not running (pid $pid was reused)"

# Join the node's cgroups first (its cgroup namespace is rooted there), so that what runs in the
# node is accounted to it and sees itself at "/" like the node's own processes.
if [[ -f $NODE_DIR/node.cgroup ]]; then
    while read -r cg; do
        echo $$ >"$cg/cgroup.procs" || die "cannot join the node's cgroup $cg"
    done <"$NODE_DIR/node.cgroup"
fi

exec nsenter --target "$pid" --mount --uts --ipc --net --pid --cgroup --root --wd -- \
    /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 HOSTNAME="$(nsenter --target "$pid" --uts hostname)" \
    PODMAN_IGNORE_CGROUPSV1_WARNING=1 "$@"
