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
bench:
	$(WITH_PROTOC) $(CARGO) build --release -p daemon --bin berthd
	$(WITH_PROTOC) $(CARGO) run --release -p bench --bin berth-bench

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(WITH_PROTOC) $(CARGO) clippy --workspace --all-targets -- -D warnings

## Builds the berth image in the local Docker with berthd itself (needs root, runc and a Docker
## Engine; deploy/README.md): $(IMAGE):$(VERSION) and $(IMAGE):latest, then prints its size.
IMAGE ?= berth
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
IMAGE_MAX_BYTES ?= 40000000
image:
	$(WITH_PROTOC) $(CARGO) build --release -p daemon --bin berthd -p buildctl --bin buildctl -p berth-image
	$(TARGET_DIR)/release/berth-image --berthd $(TARGET_DIR)/release/berthd \
		--buildctl $(TARGET_DIR)/release/buildctl --work $(TARGET_DIR)/image \
		--tag $(IMAGE):$(VERSION) --tag $(IMAGE):latest --epoch $(SOURCE_DATE_EPOCH) \
		--revision "$$(git rev-parse HEAD 2>/dev/null || echo unknown)"
	@docker image inspect --format '{{.Size}}' $(IMAGE):$(VERSION) | awk -v max=$(IMAGE_MAX_BYTES) \
		'{ printf "image $(IMAGE):$(VERSION) (and :latest): %.1f MB (%d bytes)%s\n", $$1 / 1e6, $$1, \
		   ($$1 > max ? sprintf(" -- over the %.0f MB target", max / 1e6) : "") }'

## The README's `make run` on a plain Debian 12 made here with debootstrap (Rust toolchain, gcc
## and make only; Docker socket and data root mounted): waits for a listening berthd. Slow (a cold
## release build), so not part of `make test`. Needs root and Docker.
fresh-check:
	bash tools/fresh-machine-check.sh

clean:
	$(CARGO) clean
