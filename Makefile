# The two commands a fresh machine needs:
#   make demo   start a local cluster, write through every node, show that all converged
#   make test   the whole test suite (what CI runs)
#   make bench  every benchmark, tables printed and JSON in target/bench-results/ (not in CI)
#   make fuzz   every fuzz target for a minute (FUZZ_SECONDS), nightly Rust (not in CI)
.PHONY: deps demo test lint bench fuzz

deps:
	@scripts/install-deps.sh

demo: deps
	cargo build --release --bin raftmap
	cargo run --release --quiet --bin raftmap -- demo

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test: lint
	cargo test --workspace --locked

bench: deps
	benches/run-all.sh

fuzz: deps
	scripts/fuzz.sh
