#!/usr/bin/env bash
# Installs the system packages raftmap builds against, if they are missing.
#   librocksdb-dev     RocksDB, linked instead of compiled from source (minutes, not half an hour)
#   libclang-dev       bindgen, used by the rocksdb crate's build script
#   protobuf-compiler  protoc, for the gRPC definitions
set -euo pipefail

packages=(librocksdb-dev libclang-dev protobuf-compiler pkg-config)
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
