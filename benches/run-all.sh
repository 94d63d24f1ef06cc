#!/usr/bin/env bash
# Runs every raftmap benchmark on this machine and writes their JSON next to the printed
# tables (default target/bench-results/). Needs root (BPF maps, capture programs).
#   benches/run-all.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${CARGO_TARGET_DIR:-target}/bench-results}
mkdir -p "$out"
cargo build --release --locked --bin raftmap --bin cluster-write --bin kernel-replication \
  --bin capture-overhead --bin cluster-ops --bin greedy-clients --bin fanout
bin=${CARGO_TARGET_DIR:-target}/release
echo "## Capture overhead (syscall backend)"
"$bin/capture-overhead" --json "$out/capture-overhead.json"
echo
# The fexit backend where it loads: QEMU guests with Debian's stock kernels (emulated CPU: the
# ratios to the baseline measured in the same guest are the figures, not the nanoseconds).
for kernel in debian12 debian13; do
  echo "## Capture overhead (fexit backend, $kernel guest, emulated: ratios only)"
  RAFTMAP_VM_KERNEL=$kernel scripts/vm-run.sh "$bin/capture-overhead" --backend fexit \
    --updates 20000 --rounds 5 | grep -v '^\(SeaBIOS\|Booting\|$\)'
done
echo
echo "## Kernel write to remote kernel map, 3 nodes"
"$bin/kernel-replication" --rates 1000,10000,50000,100000,max --seconds 5 --fsync on,off \
  --json "$out/kernel-replication.json"
echo
echo "## Client API writes, 3 nodes"
"$bin/cluster-write" --writers 1,64 --seconds 5 --json "$out/cluster-write.json"
echo
echo "## Catch-up, footprint, failover"
"$bin/cluster-ops" --entries 1000000 --failovers 5 --json "$out/cluster-ops.json"
echo
echo "## Failover with shorter timeouts (heartbeat 50 ms, election timeout 300 ms)"
"$bin/cluster-ops" --entries 100000 --failovers 5 --agent-arg=--heartbeat-ms=50 \
  --agent-arg=--election-timeout-ms=300 --json "$out/cluster-ops-short-timeouts.json"
echo
echo "## Greedy clients: 1,000 watchers that never read and a frozen one; failing CAS over 64 KiB values"
"$bin/greedy-clients" --seconds 5 --json "$out/greedy-clients.json"
echo
echo "## The ceiling of one leader: learners under a fixed write rate"
"$bin/fanout" --learners 0,1,2,4,8 --rate 100 --ops-per-write 10 --seconds 5 --json "$out/fanout-10.json"
"$bin/fanout" --learners 0,1,2,4,8 --rate 100 --ops-per-write 100 --seconds 5 --json "$out/fanout-100.json"
echo
echo "JSON in $out"
