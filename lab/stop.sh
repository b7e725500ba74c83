#!/usr/bin/env bash
# lab/stop.sh NODE_DIR — tears down a lab node started by lab/enter.sh, also after a crash.
#
# Kills the node's init (NODE_DIR/node.pid; with the node's PID namespace, the kernel then
# kills every process of the node: conmon, containers), waits for it, and removes the node's
# cgroup subtrees (.../migrate-lab/NETNS, listed in NODE_DIR/node.cgroup), deepest first. Its
# mounts lived only in its mount namespace and are gone with its processes. NODE_DIR itself (the
# node's podman storage) is kept; remove it with `rm -rf --one-file-system NODE_DIR` if wanted.
# Safe to run twice, or on a node that never started.
set -euo pipefail

die() { echo "stop.sh: error: $*" >&2; exit 1; }
(($# == 1)) || die "usage: stop.sh NODE_DIR"
NODE_DIR=$1
[[ $EUID -eq 0 ]] || die "must run as root"
[[ -d $NODE_DIR ]] || exit 0

if [[ -f $NODE_DIR/node.pid ]]; then
    read -r pid start <"$NODE_DIR/node.pid" || true
    if [[ -n ${pid:-} && -r /proc/$pid/stat ]]; then
        read -r -a st </proc/"$pid"/stat
        if [[ ${st[21]} == "${start:-}" ]]; then
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.05; done
            [[ ! -e /proc/$pid ]] || die "node init $pid did not exit"
        fi
    fi
    rm -f "$NODE_DIR/node.pid"
fi

if [[ -f $NODE_DIR/node.cgroup ]]; then
    left=()
    while read -r cg; do
        [[ $cg == /sys/fs/cgroup/*/migrate-lab/?* && $cg != *..* ]] \
            || die "bad cgroup path '$cg' in $NODE_DIR/node.cgroup"
        [[ -d $cg ]] || continue
        # Processes of a killed PID namespace can take a moment to leave their cgroups.
        for _ in $(seq 50); do
            find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null && break
            sleep 0.1
        done
        [[ -d $cg ]] && left+=("$cg")
        # The shared migrate-lab parent goes when its last node does.
        rmdir "$(dirname "$cg")" 2>/dev/null || true
    done <"$NODE_DIR/node.cgroup"
    ((${#left[@]} == 0)) || die "cgroups still busy: ${left[*]} (processes left: $(cat "${left[0]}/cgroup.procs" | tr '\n' ' '))"
    rm -f "$NODE_DIR/node.cgroup"
fi
