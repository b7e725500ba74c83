#!/usr/bin/env bash
# e2e/k8s/migrate-nginx.sh — the in-cluster end-to-end test, run on node1 of the Vagrant cluster:
#   vagrant ssh node1 -c 'sudo /vagrant/e2e/k8s/migrate-nginx.sh'
#
# 1. makes sure the cluster is finished (kubelet serving certificates approved, the migrate
#    DaemonSet installed and rolled out; finish-cluster.sh when it is not)
# 2. builds the migrate CLI from /vagrant (cargo build --release -p cli)
# 3. creates a bare Pod nginx (docker.io/library/nginx:stable) on node1, waits until Ready
# 4. writes a file with random content into nginx's web root (kubectl exec)
# 5. migrate nginx --from node1 --to node2 --certs ~/.config/migrate/certs/operator
# 6. finds the new Pod on node2 by label, waits until Ready, fetches the file from its Pod IP
#    and compares; checks that the source Pod is gone
# Prints PASS, or FAIL with the step that failed; removes its Pods on exit.
# Knobs: FROM_NODE, TO_NODE (node1, node2), READY_TIMEOUT (seconds, 180), MIGRATE_ARGS (extra
# arguments for migrate, e.g. "-v").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$HERE/lib.sh"
need_root

FROM_NODE=${FROM_NODE:-node1}
TO_NODE=${TO_NODE:-node2}
READY_TIMEOUT=${READY_TIMEOUT:-180}
LABEL=app=nginx-migrate-e2e
POD=nginx
NS=default
FILE=e2e-$$.txt
WEBROOT=/usr/share/nginx/html

step="start"
failure=""
new_pod=""
fail() { failure="$step: $*"; exit 1; }

diagnostics() {
    echo "---- diagnostics ----" >&2
    kubectl -n "$NS" get pods -l "$LABEL" -o wide >&2 || true
    kubectl -n "$NS" describe pods -l "$LABEL" 2>/dev/null | tail -n 40 >&2 || true
    kubectl -n migrate get pods -o wide >&2 || true
    # Every daemon's last lines, each prefixed with its Pod (one Pod per node).
    kubectl -n migrate logs -l app.kubernetes.io/name=migrate-daemon --tail=40 --prefix >&2 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT
    if ((rc == 0)); then
        echo "PASS: $POD moved $FROM_NODE -> $TO_NODE, its file served from the new Pod${new_pod:+ ($new_pod)}"
    else
        echo "FAIL: ${failure:-$step (exit code $rc)}"
        diagnostics
    fi
    kubectl -n "$NS" delete pods -l "$LABEL" --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1 || true
    exit "$rc"
}
trap cleanup EXIT

# ---- 1. the cluster ----
step="cluster ready"
mapfile -t nodes < <(kubectl get nodes -o name | sed 's|^node/||')
for node in "$FROM_NODE" "$TO_NODE"; do
    [[ " ${nodes[*]} " == *" $node "* ]] || fail "node $node is not in the cluster (nodes: ${nodes[*]})"
done
if ! kubectl -n migrate get daemonset migrate-daemon >/dev/null 2>&1; then
    log "the migrate DaemonSet is not installed: running finish-cluster.sh"
    "$HERE/finish-cluster.sh" || fail "finish-cluster.sh failed"
fi
for node in "${nodes[@]}"; do
    wait_serving_cert "$node" 120
done
kubectl -n migrate rollout status ds/migrate-daemon --timeout="${READY_TIMEOUT}s" >&2 \
    || fail "the migrate DaemonSet is not ready"

# ---- 2. the CLI ----
step="build the migrate CLI"
build_cli

# ---- 3. the source Pod ----
step="create Pod $POD on $FROM_NODE"
kubectl -n "$NS" delete pods -l "$LABEL" --ignore-not-found --wait=true --timeout=60s >/dev/null
kubectl -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $POD
  namespace: $NS
  labels:
    app: nginx-migrate-e2e
spec:
  nodeName: $FROM_NODE
  containers:
    - name: nginx
      image: docker.io/library/nginx:stable
      ports:
        - containerPort: 80
      readinessProbe:
        httpGet:
          path: /
          port: 80
        periodSeconds: 2
YAML
kubectl -n "$NS" wait --for=condition=Ready "pod/$POD" --timeout="${READY_TIMEOUT}s" >&2 \
    || fail "Pod $POD did not become Ready within ${READY_TIMEOUT} s"

# ---- 4. state that must survive ----
step="write the test file into $POD"
content=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
# shellcheck disable=SC2016 # $1 and $2 are expanded by the Pod's sh, not here
kubectl -n "$NS" exec "$POD" -c nginx -- sh -c 'printf %s "$1" > "$2"' _ "$content" "$WEBROOT/$FILE" \
    || fail "kubectl exec could not write $WEBROOT/$FILE"
src_ip=$(kubectl -n "$NS" get pod "$POD" -o jsonpath='{.status.podIP}')
got=$(curl -fsS --max-time 10 "http://$src_ip/$FILE") || fail "the source Pod does not serve $FILE at $src_ip"
[[ $got == "$content" ]] || fail "the source Pod serves other content than was written"

# ---- 5. the migration ----
step="migrate $POD --from $FROM_NODE --to $TO_NODE"
log "$step"
read -r -a extra <<<"${MIGRATE_ARGS:-}"
started=$SECONDS
migrate "$POD" --from "$FROM_NODE" --to "$TO_NODE" --certs "$CERTS_DIR/operator" "${extra[@]}" \
    || fail "migrate exited with an error"
log "migrate took $((SECONDS - started)) s"

# ---- 6. the result ----
step="find the new Pod on $TO_NODE"
new_pod=""
deadline=$((SECONDS + 60))
while [[ -z $new_pod ]] && ((SECONDS < deadline)); do
    new_pod=$(kubectl -n "$NS" get pods -l "$LABEL" --field-selector "spec.nodeName=$TO_NODE" \
        -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
    [[ -n $new_pod ]] || sleep 1
done
[[ -n $new_pod ]] || fail "no Pod labelled $LABEL on $TO_NODE"
kubectl -n "$NS" wait --for=condition=Ready "pod/$new_pod" --timeout="${READY_TIMEOUT}s" >&2 \
    || fail "Pod $new_pod on $TO_NODE did not become Ready within ${READY_TIMEOUT} s"

step="fetch $FILE from $new_pod"
new_ip=$(kubectl -n "$NS" get pod "$new_pod" -o jsonpath='{.status.podIP}')
[[ -n $new_ip ]] || fail "Pod $new_pod has no IP"
got=$(curl -fsS --max-time 10 --retry 5 --retry-connrefused --retry-delay 1 "http://$new_ip/$FILE") \
    || fail "curl http://$new_ip/$FILE failed"
[[ $got == "$content" ]] || fail "content differs: wrote ${content:0:16}..., got '${got:0:64}'"

step="the source Pod is gone"
kubectl -n "$NS" wait --for=delete pods -l "$LABEL" --field-selector "spec.nodeName=$FROM_NODE" \
    --timeout=60s >/dev/null 2>&1 || true
left=$(kubectl -n "$NS" get pods -l "$LABEL" --field-selector "spec.nodeName=$FROM_NODE" -o name)
[[ -z $left ]] || fail "still on $FROM_NODE: $left"
if [[ $new_pod != "$POD" ]] && kubectl -n "$NS" get pod "$POD" >/dev/null 2>&1; then
    fail "Pod $POD still exists"
fi
step="done"
