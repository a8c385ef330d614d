# berth: developer entry points. See README.md.
CARGO ?= cargo
BERTHD_ARGS ?=

.PHONY: build test run bench fmt lint image clean

build:
	$(CARGO) build --workspace --release --bin berthd

## Runs every test: unit tests and the integration tests against the real
## Docker Engine, runc, overlayfs and a local registry (needs root).
test:
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

## Runs berthd against the local Docker Engine on the default buildkitd socket.
run: build
	./target/release/berthd --debug $(BERTHD_ARGS)

## Benchmarks berth against `docker load` on this machine (needs root and Docker; ~15 min on
## 2 cores); prints the table and writes docs/benchmarks.md. berthd is built for its idle RSS.
bench:
	$(CARGO) build --release -p daemon --bin berthd
	$(CARGO) run --release -p bench --bin berth-bench

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

image:
	@echo "make image: not yet (packaging as the buildkitd image comes later)"; exit 1

clean:
	$(CARGO) clean
