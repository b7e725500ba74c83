#!/usr/bin/env bash
# lab/smoke.sh — end-to-end proof that the lab's root filesystem and node scripts work.
#
# 1. builds (or reuses) the root with lab/rootfs.sh;
# 2. makes two network namespaces joined by a veth pair (10.231.78.1 <-> .2), and starts two
#    nodes (node-a, node-b) in them with lab/enter.sh, each running `catatonit -P` as its init,
#    sharing one host folder as /shared;
# 3. in node-a: `criu check`, builds a busybox-static rootfs tar, `podman import`s it as
#    localhost/lab/busybox, runs a counter container (--network=host: the node's namespace),
#    and `podman container checkpoint --export=/shared/ckpt.tar --compress=none`;
# 4. in node-b: imports the same busybox tar, `podman container restore --import`, and checks
#    the counter continues from the value it had at the checkpoint (read from the archive's
#    rootfs-diff.tar) instead of starting again from 0;
# 5. cleans up: containers, nodes (lab/stop.sh), namespaces, node folders; checks that no
#    process or cgroup of the lab is left.
# Prints PASS/FAIL per check and "N passed, N failed"; exits 1 when anything failed.
#
# Environment: ROOTFS (default /var/lib/migrate-lab/rootfs), SMOKE_DIR (default
# /var/tmp/migrate-lab-smoke; removed at the end), KEEP=1 keeps nodes and folders for a look.
set -euo pipefail

LAB=$(cd "$(dirname "$0")" && pwd)
ROOTFS=${ROOTFS:-/var/lib/migrate-lab/rootfs}
SMOKE_DIR=${SMOKE_DIR:-/var/tmp/migrate-lab-smoke}
NS_A=migrate-smoke-a NS_B=migrate-smoke-b
ADDR_A=10.231.78.1 ADDR_B=10.231.78.2
A=$SMOKE_DIR/node-a B=$SMOKE_DIR/node-b
SHARED=$SMOKE_DIR/shared

[[ $EUID -eq 0 ]] || { echo "smoke.sh: error: must run as root" >&2; exit 1; }

passed=0 failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
step() { printf '\n==> %s\n' "$*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# cgroupfs files have size 0 in stat: read them.
has_procs() { [[ -n $(cat "$1/cgroup.procs" 2>/dev/null) ]]; }
in_a() { "$LAB/exec.sh" "$A" -- "$@"; }
in_b() { "$LAB/exec.sh" "$B" -- "$@"; }

finish() {
    local rc=$?
    set +e
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "KEEP=1: nodes left running; stop with $LAB/stop.sh $A; $LAB/stop.sh $B"
    else
        step "cleanup"
        for n in "$A" "$B"; do
            [[ -f $n/node.pid ]] && "$LAB/exec.sh" "$n" -- podman rm -a -f -t 0 >/dev/null 2>&1
            "$LAB/stop.sh" "$n"
        done
        ip netns del "$NS_A" 2>/dev/null
        ip netns del "$NS_B" 2>/dev/null
        leftover_cg=$(cat "$A/node.cgroup" "$B/node.cgroup" 2>/dev/null | while read -r cg; do
            [[ -d $cg ]] && echo "$cg"; done)
        check "no cgroup of the nodes is left" test -z "$leftover_cg"
        check "no process of the nodes is left (catatonit, conmon, counter)" \
            bash -c "! pgrep -f 'node-[ab]/|catatonit[ ]-P|[/]shared/ckpt' >/dev/null && ! pgrep -x conmon >/dev/null"
        check "network namespaces removed" bash -c "! ip netns list | grep -q migrate-smoke"
        rm -rf --one-file-system "$SMOKE_DIR"
        check "node folders removed" test ! -e "$SMOKE_DIR"
    fi
    echo
    echo "smoke: $passed passed, $failed failed"
    ((failed == 0 && rc == 0)) || exit 1
}
trap finish EXIT
trap 'fail "command failed (line $LINENO): $BASH_COMMAND"' ERR

step "root filesystem ($ROOTFS)"
t0=$(now)
"$LAB/rootfs.sh" "$ROOTFS"
t1=$(now)
echo "rootfs.sh took $(secs "$t0" "$t1") s; $(grep -E '^(built|seconds|versions)=' "$ROOTFS/etc/migrate-lab/stamp" | tr '\n' ' ')"

step "two nodes in their own network namespaces"
# Leftovers of an interrupted earlier run.
for n in "$A" "$B"; do "$LAB/stop.sh" "$n" 2>/dev/null || true; done
ip netns del "$NS_A" 2>/dev/null || true
ip netns del "$NS_B" 2>/dev/null || true
rm -rf --one-file-system "$SMOKE_DIR"
mkdir -p "$SHARED"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add migsmoke-a netns "$NS_A" type veth peer name migsmoke-b netns "$NS_B"
ip -n "$NS_A" addr add "$ADDR_A/24" dev migsmoke-a
ip -n "$NS_B" addr add "$ADDR_B/24" dev migsmoke-b
for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "migsmoke-${ns##*-}" up
done
start_node() { # NODE_DIR NETNS
    setsid "$LAB/enter.sh" --netns "$2" --bind "$SHARED:/shared" "$ROOTFS" "$1" -- catatonit -P \
        >"$1.log" 2>&1 </dev/null &
    for _ in $(seq 100); do [[ -f $1/node.pid ]] && return 0; sleep 0.05; done
    cat "$1.log" >&2
    return 1
}
check "node-a started (enter.sh)" start_node "$A" "$NS_A"
check "node-b started (enter.sh)" start_node "$B" "$NS_B"
check "node-a has its own hostname" test "$(in_a hostname)" = node-a
check "node-b has its own hostname" test "$(in_b hostname)" = node-b
check "node-a sees only its own address ($ADDR_A)" \
    bash -c "[[ \$('$LAB/exec.sh' '$A' -- ip -4 -o addr show | awk '{print \$4}' | sort | tr '\n' ' ') == '$ADDR_A/24 127.0.0.1/8 ' ]]"
check "node-a reaches node-b over the veth (ping $ADDR_B)" in_a busybox ping -c 1 -W 2 "$ADDR_B"
check "node-a is PID 1 = catatonit in its own PID namespace" \
    bash -c "[[ \$('$LAB/exec.sh' '$A' -- cat /proc/1/comm) == catatonit ]]"
check "the shared root is read-only inside a node" \
    bash -c "'$LAB/exec.sh' '$A' -- touch /etc/x 2>&1 | grep -q 'Read-only file system'"
check "node-a's /var/lib/containers is its own folder" \
    bash -c "'$LAB/exec.sh' '$A' -- touch /var/lib/containers/.probe && test -f '$A/containers/.probe' && test ! -e '$B/containers/.probe'"

step "CRIU in node-a"
criu_version=$(in_a criu --version | awk '/^Version:/ {print $2}')
check "criu is 4.2.x (found $criu_version)" test "${criu_version%.*}" = 4.2
out=$(in_a criu check 2>&1) || true
echo "$out"
check "criu check passes in node-a" test "$out" = "Looks good."
out=$(in_b criu check 2>&1) || true
check "criu check passes in node-b" test "$out" = "Looks good."
info=$(in_a podman info --format '{{.Host.CgroupManager}} {{.Host.CgroupsVersion}} {{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}} {{.Host.EventLogger}}')
echo "podman info: $info"
check "podman: cgroupfs, cgroup v1, overlay storage, crun, file events" test "$info" = "cgroupfs v1 overlay crun file"

step "busybox image in both nodes"
in_a sh -euc '
    d=$(mktemp -d)
    mkdir -p "$d/bin" "$d/tmp" "$d/etc" "$d/proc" "$d/sys" "$d/dev" "$d/root"
    cp /bin/busybox "$d/bin/busybox"
    for a in $(/bin/busybox --list); do [ -e "$d/bin/$a" ] || ln -s busybox "$d/bin/$a"; done
    chmod 1777 "$d/tmp"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$d" -cf /shared/busybox-rootfs.tar .
    rm -rf "$d"'
img_a=$(in_a podman import -q --change CMD=/bin/sh /shared/busybox-rootfs.tar localhost/lab/busybox)
img_b=$(in_b podman import -q --change CMD=/bin/sh /shared/busybox-rootfs.tar localhost/lab/busybox)
echo "image in node-a: $img_a; in node-b: $img_b"
check "localhost/lab/busybox imported in both nodes" test -n "$img_a" -a -n "$img_b"
check "node-b's storage does not see node-a's containers" test -z "$(in_b podman ps -aq)"

step "counter in node-a"
in_a podman run -d --name counter --network=host localhost/lab/busybox \
    sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done' >/dev/null
# Let it count to 10 at least, so that a restart from 0 cannot pass for a continuation below.
for _ in $(seq 50); do
    c=$(in_a podman exec counter cat /tmp/count 2>/dev/null || echo 0)
    ((c >= 10)) && break
    sleep 0.2
done
check "counter runs in node-a (count=$c)" test "$c" -ge 10
id_a=$(in_a podman inspect -f '{{.Id}}' counter)
cg_a=$(grep '/memory/' "$A/node.cgroup")
check "counter's cgroup is in node-a's subtree on the host ($cg_a/libpod_parent/libpod-${id_a:0:12}...)" \
    has_procs "$cg_a/libpod_parent/libpod-$id_a"

step "checkpoint in node-a"
t0=$(now)
in_a podman container checkpoint --export=/shared/ckpt.tar --compress=none counter >/dev/null
t1=$(now)
ckpt_s=$(secs "$t0" "$t1")
check "podman container checkpoint --export --compress=none ($ckpt_s s, $(stat -c %s "$SHARED/ckpt.tar") bytes)" \
    test -s "$SHARED/ckpt.tar"
check "archive is an uncompressed tar holding CRIU pages" bash -c "tar -tf '$SHARED/ckpt.tar' | grep -q '^checkpoint/pages-'"
v=$(tar -xOf "$SHARED/ckpt.tar" rootfs-diff.tar | tar -xO tmp/count)
check "checkpointed count read from the archive's rootfs-diff.tar (count=$v)" test "$v" -ge 10
check "counter is stopped in node-a after the checkpoint" \
    test "$(in_a podman inspect -f '{{.State.Status}}' counter)" = exited

step "restore in node-b"
t0=$(now)
in_b podman container restore --import=/shared/ckpt.tar >/dev/null
t1=$(now)
rest_s=$(secs "$t0" "$t1")
first=$(in_b podman exec counter cat /tmp/count)
check "podman container restore --import in node-b ($rest_s s)" \
    test "$(in_b podman inspect -f '{{.State.Status}}' counter)" = running
sleep 1.5
later=$(in_b podman exec counter cat /tmp/count)
echo "checkpointed count $v; right after restore $first; 1.5 s later $later"
# A counter started again from 0 would be at about 7 after 1.5 s, below v + 3 (v >= 10).
check "counter continues from its checkpointed value ($v -> $first -> $later)" \
    bash -c "((  $first >= $v && $later >= $v + 3 && $later <= $v + 60 ))"
id_b=$(in_b podman inspect -f '{{.Id}}' counter)
cg_b=$(grep '/memory/' "$B/node.cgroup")
check "restored counter (same ID ${id_b:0:12}) lives in node-b's cgroup subtree, not node-a's" \
    bash -c "$(declare -f has_procs); has_procs '$cg_b/libpod_parent/libpod-$id_b' && ! has_procs '$cg_a/libpod_parent/libpod-$id_b'"
echo "timings: checkpoint+export ${ckpt_s} s, restore --import ${rest_s} s"
