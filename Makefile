# The project's commands. `make demo` and `make test` are the two the README promises.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo demo-transport test lint lint-k8s unit deps lab-rootfs bench bench-floor bench-micro bench-migration fuzz clean

## demo: a real live migration in the lab: bring up node1 and node2 (building the lab root the
## first time), start nginx on node1, `migrate web --from node1 --to node2`, fetch the page
## from node2.
demo: deps lab-rootfs
	./scripts/demo.sh

## demo-transport: the transport alone: a generated checkpoint-like file moved between two
## `migrate` processes over QUIC with mutual TLS, then again after 5% of it changed (dedup).
demo-transport: deps
	./scripts/demo-transport.sh

## test: formatting, clippy, then every test of the workspace (some run podman and CRIU in lab
## nodes, so the lab root is built first).
test: deps lab-rootfs lint lint-k8s unit

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## lint-k8s: syntax checks of the Kubernetes files that cannot run here: ruby -c Vagrantfile,
## bash -n and shellcheck on deploy/ and e2e/k8s/ scripts, kubectl kustomize deploy/.
lint-k8s:
	./scripts/check-k8s-files.sh

unit:
	$(CARGO) test --workspace

## lab-rootfs: the cached trixie root with podman, crun and CRIU 4.2 that lab nodes share
## (about 75 s the first time; instant when cached).
lab-rootfs:
	./lab/rootfs.sh

## deps: system packages the demo, tests and benchmarks need (Debian; run as root).
deps:
	./scripts/install-deps.sh

## bench: the side-by-side transfer benchmark against zstd | TCP | zstd -d.
bench: deps
	./benches/run-transfer.sh

## bench-floor: the transfer bench (3 runs), then `cpu-floor`: the least time the work a transfer
## must do could take on this machine's cores, against the targets the bench's medians set.
bench-floor: deps
	./benches/run-transfer.sh --runs 3 --skip-rss --json-out target/bench-transfer.json
	target/release/cpu-floor --transfer-json target/bench-transfer.json

## bench-migration: redis holding 1 GiB moved node1 -> node2 in the lab by `migrate redis` and
## by Podman's checkpoint --export / TCP copy / restore --import, interleaved; prints medians and
## writes target/bench-migration.json (root; knobs BENCH_RUNS, BENCH_KEYS... in the script).
bench-migration: deps lab-rootfs
	./benches/run-migration.sh

## bench-micro: criterion benches for chunking, hashing and compression.
bench-micro:
	$(CARGO) bench -p benches

## fuzz: the frame decoder under libFuzzer (needs the nightly toolchain and cargo-fuzz).
fuzz:
	cd transport && $(CARGO) +nightly fuzz run frame_decoder -- -max_total_time=120

clean:
	$(CARGO) clean
