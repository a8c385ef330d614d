# berth: developer entry points. See README.md.
CARGO ?= cargo
BERTHD_ARGS ?=

# containerd-client's build script runs protoc (prost-build reads $PROTOC, else `protoc` on PATH);
# berth's own protos need none (protox). Without a protoc on PATH, the protoc binary published in
# the protoc-bin-vendored crates on crates.io is used (tools/vendored-protoc prints its path), so
# a fresh machine needs nothing but the Rust toolchain.
WITH_PROTOC = PROTOC="$${PROTOC:-$$(command -v protoc || $(CARGO) run -q -p vendored-protoc)}"
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: build test run bench fmt lint image fresh-check clean

build:
	$(WITH_PROTOC) $(CARGO) build --workspace --release --bin berthd

## Runs every test: unit tests and the integration tests against the real
## Docker Engine, runc, overlayfs and a local registry (needs root).
test:
	$(WITH_PROTOC) $(CARGO) test --workspace --no-fail-fast -- --test-threads=2

## Runs berthd against the local Docker Engine on the default buildkitd socket.
run: build
	$(TARGET_DIR)/release/berthd --debug $(BERTHD_ARGS)

## Benchmarks berth against `docker load` on this machine (needs root and Docker; ~15 min on
## 2 cores); prints the table and writes docs/benchmarks.md. berthd is built for its idle RSS.
## Scenario 7's baseline is the same berthd with every tracing callsite compiled out, built into
## its own target dir (tracing's max-level features unify across the build).
bench:
	$(WITH_PROTOC) $(CARGO) build --release -p daemon --bin berthd
	$(WITH_PROTOC) $(CARGO) build --release -p daemon --bin berthd --features tracing/max_level_off --target-dir $(TARGET_DIR)/bench-baseline
	BERTH_BENCH_BASELINE_BERTHD=$(abspath $(TARGET_DIR))/bench-baseline/release/berthd $(WITH_PROTOC) $(CARGO) run --release -p bench --bin berth-bench

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(WITH_PROTOC) $(CARGO) clippy --workspace --all-targets -- -D warnings

## Builds the berth image in the local Docker with berthd itself (needs root, runc and a Docker
## Engine; deploy/README.md): $(IMAGE):$(VERSION) and $(IMAGE):latest, then prints its size and
## whether it is under IMAGE_MAX_BYTES. The binaries come from the `image` cargo profile (release
## optimised for size); IMAGE_PROFILE=dev packages the debug binaries (larger; what the
## integration test does, reusing what `make test` built).
IMAGE ?= berth
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
IMAGE_MAX_BYTES ?= 40000000
IMAGE_PROFILE ?= image
IMAGE_BIN = $(TARGET_DIR)/$(if $(filter dev,$(IMAGE_PROFILE)),debug,$(IMAGE_PROFILE))
image:
	@# One cargo run per binary, as the integration tests build them: with IMAGE_PROFILE=dev the
	@# binaries `make test` built are reused instead of rebuilt with other unified features.
	$(WITH_PROTOC) $(CARGO) build --profile $(IMAGE_PROFILE) -p daemon --bin berthd
	$(WITH_PROTOC) $(CARGO) build --profile $(IMAGE_PROFILE) -p buildctl --bin buildctl
	$(WITH_PROTOC) $(CARGO) build --profile $(IMAGE_PROFILE) -p berth-image --bin berth-image
	$(IMAGE_BIN)/berth-image --berthd $(IMAGE_BIN)/berthd \
		--buildctl $(IMAGE_BIN)/buildctl --work $(TARGET_DIR)/image-work/$(IMAGE_PROFILE) \
		--tag $(IMAGE):$(VERSION) --tag $(IMAGE):latest --epoch $(SOURCE_DATE_EPOCH) \
		--revision "$$(git rev-parse HEAD 2>/dev/null || echo unknown)"
	@docker image inspect --format '{{.Size}}' $(IMAGE):$(VERSION) | awk -v max=$(IMAGE_MAX_BYTES) \
		'{ printf "image $(IMAGE):$(VERSION) (and :latest): %.1f MB (%d bytes), %s the %.0f MB target ($(IMAGE_PROFILE) profile)\n", \
		   $$1 / 1e6, $$1, ($$1 > max ? "over" : "under"), max / 1e6 }'

## The README's `make run` on a plain Debian 12 made here with debootstrap (Rust toolchain, gcc
## and make only; Docker socket and data root mounted): waits for a listening berthd. Slow (a cold
## release build), so not part of `make test`. Needs root and Docker.
fresh-check:
	bash tools/fresh-machine-check.sh

clean:
	$(CARGO) clean
