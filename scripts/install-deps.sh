#!/usr/bin/env bash
# Installs the system packages raftmap builds against, if they are missing.
#   librocksdb-dev     RocksDB, linked instead of compiled from source (minutes, not half an hour)
#   libclang-dev       bindgen, used by the rocksdb crate's build script
#   protobuf-compiler  protoc, for the gRPC definitions
#   clang-19 libbpf-dev  the BPF programs in ebpf-hooks/bpf (compiled by ebpf-hooks/build.rs)
#   bpftool            to look at kernel maps (the demo shows a dump)
#   qemu-system-x86 busybox-static cpio  scripts/vm-run.sh, QEMU guests on Debian 12's and 13's
#                      stock kernels (6.1, 6.12), where fexit works
#   python3-venv       the manifest checkers of deploy/ (kubernetes-validate, checkov), from PyPI
#                      into RAFTMAP_TOOLS (/var/cache/raftmap-tools); kubectl renders them
#   podman runc debootstrap  deploy/image/build.sh builds the image from a Debian rootfs, and
#                      raft-node/tests/kubernetes.rs runs the rendered manifests in containers
# all without Recommends (qemu's are ~150 GUI packages); mounts bpffs at /sys/fs/bpf when it is
# missing, and caches the guest kernels for scripts/vm-run.sh.
set -euo pipefail

packages=(librocksdb-dev libclang-dev protobuf-compiler pkg-config clang-19 libbpf-dev bpftool
  qemu-system-x86 busybox-static cpio nftables python3-venv podman runc debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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

# The guest kernels for scripts/vm-run.sh, where fexit works (this host's kernel refuses it):
# the vmlinuz of Debian 12's and Debian 13's stock cloud kernels. Each comes through a sources
# list of its own in a temporary directory (the machine's apt sources are left alone); the
# image package's name moves with point releases, so it is resolved through the metapackage.
vm_dir=${RAFTMAP_VM_DIR:-/var/cache/raftmap-vm}
mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
fetch_kernel() { # NAME SUITE
  local dest=$vm_dir/$1 suite=$2 apt_dir pkg
  [ -e "$dest/vmlinuz" ] && return 0
  apt_dir=$(mktemp -d)
  mkdir -p "$apt_dir"/{parts,lists/partial,cache/archives/partial,unpacked}
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "${mirror:-http://deb.debian.org/debian}" "$suite" >"$apt_dir/parts/$suite.sources"
  # The Sandbox option: apt's _apt user cannot write to the temporary directory.
  local opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  $sudo apt-get "${opts[@]}" update -qq
  pkg=$(apt-cache "${opts[@]}" depends linux-image-cloud-amd64 | awk '$1 == "Depends:" { print $2; exit }')
  [ -n "$pkg" ] || { echo "no cloud kernel found in Debian $suite" >&2; exit 1; }
  (cd "$apt_dir" && $sudo apt-get "${opts[@]}" download -qq "$pkg")
  dpkg-deb -x "$apt_dir/$pkg"_*.deb "$apt_dir/unpacked"
  $sudo mkdir -p "$dest"
  $sudo install -m 644 "$apt_dir"/unpacked/boot/vmlinuz-* "$dest/vmlinuz"
  echo "$pkg" | $sudo tee "$dest/package" >/dev/null
  $sudo rm -rf "$apt_dir"
  echo "guest kernel: $pkg (Debian $suite) -> $dest/vmlinuz"
}
fetch_kernel debian12 bookworm
fetch_kernel debian13 trixie
$sudo rm -f "$vm_dir/vmlinuz" # where earlier versions kept the one guest kernel

# The checkers of deploy/'s manifests, pinned, in a virtualenv of their own (checkov brings many
# dependencies). tests/deploy.rs runs them; kubectl (which renders the overlays) comes with the
# machine image.
tools=${RAFTMAP_TOOLS:-/var/cache/raftmap-tools}
tool_versions="kubernetes-validate==1.37.0 checkov==3.3.30"
if [ "$(cat "$tools/versions" 2>/dev/null)" != "$tool_versions" ]; then
  echo "installing into $tools: $tool_versions"
  rm -rf "$tools"
  python3 -m venv "$tools"
  # shellcheck disable=SC2086 # one argument per package
  "$tools/bin/pip" install -q --disable-pip-version-check $tool_versions
  echo "$tool_versions" >"$tools/versions"
fi
command -v kubectl >/dev/null || echo "note: kubectl is missing: the deploy/ manifest tests need it (kubectl kustomize)" >&2
