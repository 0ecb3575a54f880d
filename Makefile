# Real GigaAM v3 weights (RNN-T fp32, ~890 MB) from Hugging Face into models/,
# each file SHA-256 verified; rerunning resumes a broken transfer and skips
# files already verified. Other variants: gigastt download --variant rnnt-int8|ctc|ctc-int8.
.PHONY: models
models:
	cargo run --release -- download --model-dir models

# The main job: real model on first use (verified, resumable), then the server.
.PHONY: run
run: models
	cargo run --release -- serve --model-dir models

# Our whole pipeline vs onnxruntime's encoder and onnx-asr end to end on the full-size
# random GigaAM v3 (regenerated into models/gigaam-v3-full-random/gen/ on first use, with
# .venv-bench), in rounds that turn the order. Table on stdout and in
# target/bench/results.md; see bench/README.md. Overrides: BENCH_ROUNDS=3 BENCH_REPS=3
# BENCH_THREADS="1 2" BENCH_PRECISIONS="fp32 int8" BENCH_DURATIONS=4,10,60 BENCH_ONNX_ASR=1
.PHONY: bench
bench:
	bench/run.sh

# Every test, as CI runs it (.ci/run): the Rust suites (unit, golden parity, CLI
# and REST against the real binary) then the real clients and proxies in tests/py.
# Both halves always run (--no-fail-fast, then pytest) so one run shows every
# failure; the target fails if either did.
# (The sub-make goes through SUBMAKE so that `make -n test` stays a dry run.)
SUBMAKE = $(MAKE) --no-print-directory
.PHONY: test
test:
	cargo build
	@rc=0; \
	cargo test --no-fail-fast || rc=1; \
	$(SUBMAKE) test-py || rc=1; \
	exit $$rc

# pytest in .venv-test against target/debug/gigastt (or GIGASTT_BIN):
# curl, requests, websockets, the openai SDK, Caddy 2.6 + 2.11 and nginx.
# scripts/proxy-env.sh installs what is missing (apt needs root; without it
# the proxy tests skip, unless GIGASTT_REQUIRE_TOOLS=1 as in CI).
# "No tests collected" (pytest's exit code 5) is a failure, not a pass.
VENV ?= .venv-test
PYTEST_ARGS ?= -q
.PHONY: test-py
test-py:
	GIGASTT_VENV=$(abspath $(VENV)) scripts/proxy-env.sh
	@GIGASTT_BIN=$${GIGASTT_BIN:-$(CURDIR)/target/debug/gigastt} \
		$(VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) tests/py; \
	rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test-py: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# Exactly what CI checks besides the tests: formatting, clippy with warnings as
# errors, and tract only under src/speech/ (STYLE.md: the engine owns tract).
.PHONY: lint
lint:
	@rc=0; \
	echo "cargo fmt --check"; cargo fmt --check || rc=1; \
	echo "cargo clippy --all-targets -- -D warnings"; \
	cargo clippy --all-targets -- -D warnings || rc=1; \
	if grep -rn 'tract_' --include='*.rs' src | grep -v '^src/speech/'; then \
		echo "lint: tract_ outside src/speech/ (above)" >&2; rc=1; \
	fi; \
	exit $$rc

# Static x86-64 binary (musl, no shared libraries at all): target/x86_64-unknown-linux-musl/release/gigastt.
# Needs `rustup target add x86_64-unknown-linux-musl` and Debian's musl-tools (ring's C code).
# Raspberry Pi-class boxes: RELEASE_TARGET=aarch64-unknown-linux-musl with a cross linker, see docs/deployment.md.
RELEASE_TARGET ?= x86_64-unknown-linux-musl
.PHONY: release
release:
	rustup target add $(RELEASE_TARGET)
	cargo build --release --locked --target $(RELEASE_TARGET)
	@ls -l target/$(RELEASE_TARGET)/release/gigastt
	@file target/$(RELEASE_TARGET)/release/gigastt

# Supply chain: licenses, bans and sources from deny.toml (offline); advisories
# need the RustSec database from GitHub and run where the network allows it.
.PHONY: supply-chain
supply-chain:
	@command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
	cargo deny check licenses bans sources
