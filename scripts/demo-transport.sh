#!/usr/bin/env bash
# `make demo-transport`: builds `migrate`, makes a cluster CA and two node
# certificates, generates a 512 MiB checkpoint-like file, and moves it from "node1" to "node2"
# over QUIC with mutual TLS, each node in its own network namespace on a veth pair. Then it
# rewrites 5% of the file's pages and moves it again: only the changed chunks cross the wire.
# Everything lives under $DEMO_DIR (default /var/tmp/migrate-demo) and the namespaces are
# removed on exit. Root is needed for the namespaces; without it the demo uses loopback.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-/var/tmp/migrate-demo}
SIZE=${SIZE:-512M}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIGRATE=$ROOT/target/release/migrate
GEN=$ROOT/target/release/gen-data
NS1=migrate-demo-node1
NS2=migrate-demo-node2
ADDR1=10.231.77.1
ADDR2=10.231.77.2
PORT=7443

step() { printf '\n==> %s\n' "$*"; }

cleanup() {
    [[ -n ${RECEIVER_PID:-} ]] && kill "$RECEIVER_PID" 2>/dev/null || true
    if [[ ${USE_NETNS:-0} == 1 ]]; then
        ip netns del "$NS1" 2>/dev/null || true
        ip netns del "$NS2" 2>/dev/null || true
    fi
}
trap cleanup EXIT

step "building migrate (release)"
(cd "$ROOT" && cargo build --release -q -p cli -p benches --bin migrate --bin gen-data)

mkdir -p "$DEMO_DIR"
chmod 700 "$DEMO_DIR"
rm -rf "$DEMO_DIR/certs" "$DEMO_DIR/node1" "$DEMO_DIR/node2"
mkdir -p "$DEMO_DIR/node1" "$DEMO_DIR/node2"

step "cluster CA and node certificates"
"$MIGRATE" certs init --out "$DEMO_DIR/certs" --name node1 --name node2

if [[ $EUID -eq 0 ]] && command -v ip >/dev/null; then
    USE_NETNS=1
    step "two nodes: network namespaces $NS1 ($ADDR1) and $NS2 ($ADDR2) on a veth pair"
    ip netns del "$NS1" 2>/dev/null || true
    ip netns del "$NS2" 2>/dev/null || true
    ip netns add "$NS1"
    ip netns add "$NS2"
    ip link add mgd-n1 netns "$NS1" type veth peer name mgd-n2 netns "$NS2"
    ip -n "$NS1" addr add "$ADDR1/24" dev mgd-n1
    ip -n "$NS2" addr add "$ADDR2/24" dev mgd-n2
    for ns in "$NS1" "$NS2"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$NS1" link set mgd-n1 up
    ip -n "$NS2" link set mgd-n2 up
    on1() { ip netns exec "$NS1" "$@"; }
    on2() { ip netns exec "$NS2" "$@"; }
    LISTEN=$ADDR2
else
    USE_NETNS=0
    step "not root: both nodes on loopback"
    on1() { "$@"; }
    on2() { "$@"; }
    LISTEN=127.0.0.1
fi

step "generating a $SIZE checkpoint-like file on node1 (40% zero pages, 30% text, 30% random)"
"$GEN" --size "$SIZE" --out "$DEMO_DIR/node1/checkpoint.bin"
"$GEN" --rewrite "$DEMO_DIR/node1/checkpoint.bin" --fraction 0.05 --seed 2 \
    --out "$DEMO_DIR/node1/checkpoint-later.bin"

transfer() {
    local file=$1 out=$2
    on2 "$MIGRATE" receive --listen "$LISTEN:$PORT" --store "$DEMO_DIR/node2/chunks" \
        --out "$DEMO_DIR/node2/$out" --certs "$DEMO_DIR/certs/node2" &
    RECEIVER_PID=$!
    # The receiver prints "listening" once bound; the sender retries until then anyway.
    on1 "$MIGRATE" send "$DEMO_DIR/node1/$file" --to "$LISTEN:$PORT" \
        --certs "$DEMO_DIR/certs/node1" --peer node2
    wait "$RECEIVER_PID"
    RECEIVER_PID=
    cmp "$DEMO_DIR/node1/$file" "$DEMO_DIR/node2/$out"
    echo "node2 holds an identical copy: $DEMO_DIR/node2/$out"
}

step "first transfer node1 -> node2 (empty chunk store on node2)"
transfer checkpoint.bin checkpoint.bin

step "second transfer: the same file with 5% of its pages rewritten (node2 keeps its chunk store)"
transfer checkpoint-later.bin checkpoint-later.bin

step "done; files and chunk store are in $DEMO_DIR (remove it with: rm -rf $DEMO_DIR)"
