#!/usr/bin/env bash
# Builds the raftmap container image with podman and no registry:
#   1. a Debian 12 rootfs with the runtime libraries (debootstrap --variant=minbase, about a
#      minute once; kept as the image localhost/raftmap-rootfs:bookworm);
#   2. deploy/image/Containerfile on top of it: the binary and the libraries it links, copied
#      into an empty image.
# Usage: deploy/image/build.sh [--binary PATH] [--tag NAME]
#   --binary  the raftmap binary (default: target/release/raftmap, built if missing)
#   --tag     the image name (default: localhost/raftmap:0.1.0, what deploy/base names)
# Needs root, podman, runc and debootstrap (scripts/install-deps.sh installs them). Podman runs
# with --runtime runc and lower ulimits: crun refuses hybrid cgroup hosts, and a sandbox
# without CAP_SYS_RESOURCE cannot raise podman's default limits.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
binary=""
tag=localhost/raftmap:0.1.0
while (($#)); do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    *) echo "unknown argument: $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  binary=${CARGO_TARGET_DIR:-$root/target}/release/raftmap
  [ -x "$binary" ] || (cd "$root" && cargo build --release --locked --bin raftmap)
fi
[ -x "$binary" ] || { echo "no raftmap binary at $binary" >&2; exit 1; }

podman=(podman --runtime runc)
limits=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
# The runtime libraries the binary links (librocksdb pulls snappy, gflags, lz4, zstd, bz2).
rootfs_packages=librocksdb7.8
rootfs=localhost/raftmap-rootfs:bookworm
label="raftmap.rootfs.packages=$rootfs_packages"
have=$("${podman[@]}" image inspect --format '{{index .Labels "raftmap.rootfs.packages"}}' "$rootfs" 2>/dev/null || true)
if [ "$have" != "$rootfs_packages" ]; then
  echo "building $rootfs (debootstrap, about a minute)"
  tmp=$(mktemp -d /var/tmp/raftmap-rootfs.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  debootstrap --variant=minbase --include="$rootfs_packages" bookworm "$tmp/root" "$mirror" >"$tmp/log" 2>&1 ||
    { tail -20 "$tmp/log" >&2; exit 1; }
  tar -C "$tmp/root" -c . | "${podman[@]}" import -q --change "LABEL $label" - "$rootfs" >/dev/null
  rm -rf "$tmp"
  trap - EXIT
fi

context=$(mktemp -d /var/tmp/raftmap-image.XXXXXX)
trap 'rm -rf "$context"' EXIT
cp "$here/Containerfile" "$context/"
# Debug sections are of no use in the image (a release binary has none).
objcopy --strip-debug "$binary" "$context/raftmap" 2>/dev/null || cp "$binary" "$context/raftmap"
old=$("${podman[@]}" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
# No network for the build (nothing is fetched), so podman makes no bridge on the host.
"${podman[@]}" build -q --network none "${limits[@]}" --build-arg ROOTFS="$rootfs" -t "$tag" "$context" >/dev/null
# The collecting stage's image is of no further use.
"${podman[@]}" image prune -f --filter label=raftmap.stage=collect >/dev/null
# The image the tag named before, unless something else still uses it.
new=$("${podman[@]}" image inspect --format '{{.Id}}' "$tag")
if [ -n "$old" ] && [ "$old" != "$new" ]; then "${podman[@]}" rmi "$old" >/dev/null 2>&1 || true; fi
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
echo "built $tag ($((size / 1024 / 1024)) MiB)"
