#!/usr/bin/env bash
# The README's first command (`make demo`): a real live migration in the local lab.
# Builds `migrate` (release), brings up the lab (two nodes, node1 and node2, each with its own
# network, mount and PID namespaces, podman + crun + CRIU, and a migration daemon; the first
# run builds the lab root, about 75 s), starts nginx on node1 with a page written into the
# running container, migrates it to node2 with `migrate web --from node1 --to node2`
# (progress shown), and prints the page as node2 serves it, fetched from node1 over the lab
# network. The lab stays up afterwards (`migrate lab status`, `migrate lab down`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIGRATE=$ROOT/target/release/migrate

step() { printf '\n==> %s\n' "$*"; }

[[ $(id -u) == 0 ]] || { echo "demo: the lab needs root (namespaces, mounts): run it with sudo" >&2; exit 1; }

step "building migrate (release)"
(cd "$ROOT" && cargo build --release --quiet -p cli)

step "bringing up the lab (node1, node2)"
"$MIGRATE" lab up

# A container of an earlier demo run, on either node, would clash with this one.
for n in node1 node2; do
    "$MIGRATE" lab exec "$n" -- podman rm -f -t 0 web >/dev/null 2>&1 || true
done

step "starting nginx on node1 and writing a page into the running container"
"$MIGRATE" lab exec node1 -- podman run -d --name web --network=host localhost/lab/nginx >/dev/null
"$MIGRATE" lab exec node1 -- podman exec web sh -c \
    "echo \"written on node1 at $(date -u +%H:%M:%S), served from wherever it runs now\" > /var/www/html/demo.html"
address() { "$MIGRATE" lab status | awk -v n="$1" '$1 == n { print $2 }'; }
ADDR1=$(address node1)
ADDR2=$(address node2)
for _ in $(seq 50); do
    "$MIGRATE" lab exec node2 -- busybox wget -q -T 1 -O /dev/null "http://$ADDR1/demo.html" 2>/dev/null && break
    sleep 0.2
done
echo "node1 ($ADDR1) serves: $("$MIGRATE" lab exec node2 -- busybox wget -q -O - "http://$ADDR1/demo.html")"

step "migrate web --from node1 --to node2"
"$MIGRATE" web --from node1 --to node2

step "the page, fetched from node1, as node2 ($ADDR2) serves it"
"$MIGRATE" lab exec node1 -- busybox wget -q -O - "http://$ADDR2/demo.html"
echo
echo "containers on node1: $("$MIGRATE" lab exec node1 -- podman ps --format '{{.Names}}' | tr '\n' ' ')(none means it moved)"
echo "containers on node2: $("$MIGRATE" lab exec node2 -- podman ps --format '{{.Names}}' | tr '\n' ' ')"
echo
echo "The lab stays up: 'migrate web --from node2 --to node1' moves it back; 'target/release/migrate lab down' removes it."
