#!/usr/bin/env bash
# Installs the system packages raftmap builds against, if they are missing.
#   librocksdb-dev     RocksDB, linked instead of compiled from source (minutes, not half an hour)
#   libclang-dev       bindgen, used by the rocksdb crate's build script
#   protobuf-compiler  protoc, for the gRPC definitions
#   clang-19 libbpf-dev  the BPF programs in ebpf-hooks/bpf (compiled by ebpf-hooks/build.rs)
#   bpftool            to look at kernel maps (the demo shows a dump)
#   qemu-system-x86 busybox-static cpio  scripts/vm-run.sh, a QEMU guest on Debian's 6.1 kernel (fexit)
#   python3-venv       the manifest checkers of deploy/ (kubernetes-validate, checkov), from PyPI
#                      into RAFTMAP_TOOLS (/var/cache/raftmap-tools); kubectl renders them
#   podman runc debootstrap  deploy/image/build.sh builds the image from a Debian rootfs, and
#                      raft-node/tests/kubernetes.rs runs the rendered manifests in containers
# all without Recommends (qemu's are ~150 GUI packages); mounts bpffs at /sys/fs/bpf when it is
# missing, and caches the guest kernel for scripts/vm-run.sh.
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

# The guest kernel for scripts/vm-run.sh: the vmlinuz of Debian 12's stock cloud kernel, whose
# fexit works where this host's kernel refuses it. The image package's name moves with point
# releases, so it is resolved through the metapackage; apt-get update only when that fails.
vm_dir=${RAFTMAP_VM_DIR:-/var/cache/raftmap-vm}
if [ ! -e "$vm_dir/vmlinuz" ]; then
  fetch_kernel() { # the Sandbox option: apt's _apt user cannot write to $vm_dir
    kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
      awk '$1 == "Depends:" { print $2; exit }')
    [ -n "$kernel_pkg" ] &&
      (cd "$vm_dir" && $sudo apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg")
  }
  $sudo mkdir -p "$vm_dir"
  fetch_kernel || { $sudo apt-get update -qq && fetch_kernel; }
  echo "guest kernel: $kernel_pkg -> $vm_dir/vmlinuz"
  kernel_tmp=$(mktemp -d)
  trap 'rm -rf "$kernel_tmp"' EXIT
  dpkg-deb -x "$vm_dir/$kernel_pkg"_*.deb "$kernel_tmp"
  $sudo install -m 644 "$kernel_tmp"/boot/vmlinuz-* "$vm_dir/vmlinuz"
  $sudo rm -f "$vm_dir/$kernel_pkg"_*.deb
fi

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
