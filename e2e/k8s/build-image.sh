#!/usr/bin/env bash
# e2e/k8s/build-image.sh — builds the daemon image localhost/migrate/daemon:dev from the working
# tree at /vagrant with podman, straight into the containers-storage CRI-O uses (the DaemonSet
# runs it with imagePullPolicy: Never). Run on every node; run again after changing the code,
# then `kubectl -n migrate rollout restart ds/migrate-daemon` on node1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$HERE/lib.sh"
need_root
IMAGE=localhost/migrate/daemon:dev

# A copy of the sources as the build context: the shared folder is slow, and the host's
# target/ folders (GBs) are no part of the build.
ctx=$(mktemp -d /var/tmp/migrate-build.XXXXXX)
trap 'rm -rf -- "$ctx"' EXIT
tar -C "$REPO" --exclude=./target --exclude=./.git --exclude=./.vagrant \
    --exclude=./transport/fuzz/target --exclude=./.vagrant-join.sh -cf - . | tar -C "$ctx" -xf -
log "podman build $IMAGE (compiles the workspace: several minutes on 2 CPUs)"
podman build --layers -f "$ctx/deploy/Containerfile" -t "$IMAGE" "$ctx" >&2
podman image exists "$IMAGE" || die "podman build did not produce $IMAGE"
# What CRI-O sees: the same storage.
crictl --runtime-endpoint unix:///var/run/crio/crio.sock inspecti "$IMAGE" >/dev/null \
    || die "CRI-O does not see $IMAGE: are podman and CRI-O on the same storage (/etc/containers/storage.conf)?"
log "built $IMAGE; CRI-O sees it"
