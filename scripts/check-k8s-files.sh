#!/usr/bin/env bash
# scripts/check-k8s-files.sh (make lint-k8s) — syntax checks of what cannot run here: the
# Vagrantfile, the shell scripts of deploy/ and e2e/k8s/ (and this one), and the Kubernetes
# manifests. No cluster is needed or contacted:
#   - ruby -c Vagrantfile
#   - bash -n and shellcheck (following sourced files) on every *.sh under deploy/ and
#     e2e/k8s/, and on this script
#   - kubectl kustomize deploy/ (offline rendering), every rendered document parsed as YAML
#     (python3 with PyYAML when present), and the expected objects present in the output
# Prints each check; exits 1 if any failed. Tools come from scripts/install-deps.sh.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

failed=0
ok() { printf 'ok    %s\n' "$*"; }
bad() { printf 'FAIL  %s\n' "$*"; failed=1; }
# check LABEL COMMAND...: ok or FAIL with LABEL, by COMMAND's exit status.
check() {
    local label=$1
    shift
    if "$@"; then ok "$label"; else bad "$label"; fi
}
need() {
    command -v "$1" >/dev/null && return 0
    bad "$1 not found: run scripts/install-deps.sh (as root)"
    return 1
}

# ---- Vagrantfile ----
if need ruby; then
    if out=$(ruby -c Vagrantfile 2>&1); then
        ok "ruby -c Vagrantfile"
    else
        bad "ruby -c Vagrantfile"; printf '%s\n' "$out"
    fi
fi

# ---- shell scripts ----
mapfile -t scripts < <({ find deploy e2e/k8s -name '*.sh' -type f; echo scripts/check-k8s-files.sh; } | sort -u)
((${#scripts[@]} > 1)) || bad "no shell scripts found under deploy/ and e2e/k8s/"
for f in "${scripts[@]}"; do
    if out=$(bash -n "$f" 2>&1); then
        ok "bash -n $f"
    else
        bad "bash -n $f"; printf '%s\n' "$out"
    fi
done
if need shellcheck; then
    # -x follows `. lib.sh` (the scripts say where with source-path directives).
    if out=$(shellcheck -x "${scripts[@]}" 2>&1); then
        ok "shellcheck -x (${#scripts[@]} scripts)"
    else
        bad "shellcheck -x"; printf '%s\n' "$out"
    fi
fi
for f in deploy/certs.sh deploy/install.sh deploy/entrypoint.sh e2e/k8s/migrate-nginx.sh; do
    check "executable: $f" test -x "$f"
done

# ---- manifests ----
if need kubectl; then
    rendered=$(mktemp)
    trap 'rm -f "$rendered"' EXIT
    if out=$(kubectl kustomize deploy/ 2>&1 >"$rendered"); then
        ok "kubectl kustomize deploy/ ($(grep -c '^kind:' "$rendered") objects)"
        if python3 -c 'import yaml' 2>/dev/null; then
            if out=$(python3 - "$rendered" <<'PY' 2>&1
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
for d in docs:
    for key in ("apiVersion", "kind", "metadata"):
        if key not in d:
            sys.exit(f"a document lacks {key}: {d!r:.200}")
print(len(docs))
PY
            ); then
                ok "rendered YAML parses: $out documents with apiVersion, kind, metadata"
            else
                bad "rendered YAML does not parse"; printf '%s\n' "$out"
            fi
        else
            ok "YAML parse skipped (no python3 PyYAML); kustomize parsed every document"
        fi
        # kind, then name: one line per object, as kustomize prints them (kind before metadata).
        objects=$(awk '/^kind:/ { kind = $2 } /^  name:/ && kind { print kind "/" $2; kind = "" }' "$rendered")
        for want in Namespace/migrate ServiceAccount/migrate-daemon ClusterRole/migrate-daemon \
            ClusterRoleBinding/migrate-daemon ClusterRole/migrate-operator DaemonSet/migrate-daemon; do
            check "rendered: $want" grep -qx "$want" <<<"$objects"
        done
        # The daemon's role stays minimal: nodes/checkpoint create, and never nodes/proxy.
        if grep -q 'nodes/proxy' "$rendered"; then
            bad "some rule grants nodes/proxy"
        else
            ok "no rule grants nodes/proxy"
        fi
        for want in 'image: localhost/migrate/daemon:dev' 'secretName: migrate-tls' 'hostNetwork: true' \
            'fieldPath: spec.nodeName' 'fieldPath: status.hostIP' 'path: /var/lib/migrate' \
            'path: /var/lib/kubelet/checkpoints' 'path: /var/lib/containers/storage'; do
            check "rendered DaemonSet has '$want'" grep -qF "$want" "$rendered"
        done
    else
        bad "kubectl kustomize deploy/"; printf '%s\n' "$out"
    fi
fi

if ((failed)); then
    echo "check-k8s-files: FAILED"
    exit 1
fi
echo "check-k8s-files: all checks passed"
