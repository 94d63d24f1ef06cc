#!/usr/bin/env bash
# Installs the system packages raftmap builds against, if they are missing.
#   librocksdb-dev     RocksDB, linked instead of compiled from source (minutes, not half an hour)
#   libclang-dev       bindgen, used by the rocksdb crate's build script
#   protobuf-compiler  protoc, for the gRPC definitions
#   clang-19 libbpf-dev  the BPF programs in ebpf-hooks/bpf (compiled by ebpf-hooks/build.rs)
#   bpftool            to look at kernel maps (the demo shows a dump)
# and mounts bpffs at /sys/fs/bpf when it is missing.
set -euo pipefail

packages=(librocksdb-dev libclang-dev protobuf-compiler pkg-config clang-19 libbpf-dev bpftool)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "cargo is missing: install a Rust toolchain (rustup) first" >&2; exit 1; }

# bpffs, where BPF maps are pinned (a Kubernetes node has it; a fresh VM may not).
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  if [ "$(id -u)" -eq 0 ]; then
    mount -t bpf bpf /sys/fs/bpf
  else
    echo "note: /sys/fs/bpf is not mounted (mount -t bpf bpf /sys/fs/bpf as root)" >&2
  fi
fi
