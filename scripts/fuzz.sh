#!/usr/bin/env bash
# Runs every fuzz target of raft-node/fuzz (cargo fuzz, libFuzzer) for a bounded time each
# (FUZZ_SECONDS, default 60), starting from the inputs kept under raft-node/fuzz/regressions.
# A crash is copied there (so the normal test suite replays it from then on) and fails the run.
# Needs a nightly toolchain (libFuzzer's instrumentation); builds cargo-fuzz from crates.io
# once if it is missing.
set -euo pipefail
cd "$(dirname "$0")/../raft-node"
seconds=${FUZZ_SECONDS:-60}
target_dir=${FUZZ_TARGET_DIR:-/var/tmp/raftmap-fuzz-target}

rustup toolchain list | grep -q '^nightly' || {
  echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cargo +nightly fuzz build -O -a --target-dir "$target_dir"
failed=()
for t in $(cargo +nightly fuzz list); do
  corpus=$(mktemp -d)
  cp fuzz/regressions/"$t"/* "$corpus"/ 2>/dev/null || true
  echo "== $t: ${seconds}s"
  if ! cargo +nightly fuzz run -O -a --target-dir "$target_dir" "$t" "$corpus" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12; then
    failed+=("$t")
  fi
  for crash in fuzz/artifacts/"$t"/*; do
    [ -e "$crash" ] || continue
    cp "$crash" fuzz/regressions/"$t"/
    echo "  kept $(basename "$crash") in fuzz/regressions/$t/ (replayed by cargo test -p raftmap-node)"
    failed+=("$t")
  done
  rm -rf "$corpus"
done
if ((${#failed[@]})); then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzzing: no crash in $(cargo +nightly fuzz list | wc -l) targets, ${seconds}s each"
