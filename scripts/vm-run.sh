#!/usr/bin/env bash
# Runs a binary in a QEMU guest booting one of Debian's stock cloud kernels, for the BPF tests
# that need fentry/fexit, which this host's kernel refuses:
#   scripts/vm-run.sh BINARY [ARGS...]
# Exits 77 when a VM asset (qemu, busybox, cpio, the guest kernel) is missing.
# Prints the guest console and exits 0 only if BINARY exited 0 in the guest (the guest's /init
# prints "VM-RESULT: ok", or "VM-RESULT: fail STATUS"). The guest is an initramfs holding a static
# busybox, BINARY at /test/NAME, any extra files at their own paths, and the libraries ldd lists
# for them; a tmpfs /tmp, bpffs, loopback networking (127.0.0.1 is localhost), no disk;
# RAFTMAP_VM_GUEST=1 in its environment.
# The guest kernel logs warnings and above on the console (loglevel=5: soft-lockup and RCU-stall
# reports come with their stacks); a guest whose kernel reports a fault is stopped 10 s later.
# Emulated (TCG), not KVM: /dev/kvm here hangs. The plain qemu64 CPU: emulating every feature of
# `-cpu max` (AVX and the like) made the cluster scenarios some 20% slower.
# Assets come from scripts/install-deps.sh.
#   RAFTMAP_VM_KERNEL   which kernel: debian12 (6.1, the default) or debian13 (6.12)
#   RAFTMAP_VM_FILES    extra files (space-separated absolute paths), copied to the same paths:
#                       the binaries BINARY starts (its PATH puts /usr/sbin and /usr/bin first)
#   RAFTMAP_VM_DIR      where the guest kernels are cached (default /var/cache/raftmap-vm)
#   RAFTMAP_VM_TIMEOUT  seconds before the guest is killed (default 600)
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 BINARY [ARGS...]" >&2; exit 2; }
bin=$1
shift
[ -f "$bin" ] || { echo "vm-run: no such file: $bin" >&2; exit 2; }
vm_dir=${RAFTMAP_VM_DIR:-/var/cache/raftmap-vm}
kernel=$vm_dir/${RAFTMAP_VM_KERNEL:-debian12}/vmlinuz
read -r -a extra <<<"${RAFTMAP_VM_FILES:-}"

need() { echo "vm-run: $1 is missing; scripts/install-deps.sh installs it" >&2; exit 77; }
command -v qemu-system-x86_64 >/dev/null || need "qemu-system-x86_64 (package qemu-system-x86)"
[ -x /bin/busybox ] || need "/bin/busybox (package busybox-static)"
command -v cpio >/dev/null || need "cpio"
[ -f "$kernel" ] || need "the guest kernel $kernel"
for f in "${extra[@]}"; do
  [ -f "$f" ] || { echo "vm-run: no such file: $f" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
name=$(basename "$bin")
mkdir -p "$root"/{bin,test,proc,sys,dev,tmp}
cp /bin/busybox "$root/bin/"
cp "$bin" "$root/test/$name"
for f in "${extra[@]}"; do
  cp -L --parents -t "$root" "$f"
done
# Shared libraries at the paths the loader looks for them (ldd fails on a static binary: none).
{ for f in "$bin" "${extra[@]}"; do ldd "$f" 2>/dev/null || true; done; echo /lib64/ld-linux-x86-64.so.2; } |
  grep -o '/[^ ]*' | sort -u | xargs cp -L --parents -t "$root"

# The command line, quoted for the guest's shell (printf %q output that busybox ash reads).
printf '%q ' "/test/$name" "$@" >"$root/test/cmdline"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/bin:/test RUST_BACKTRACE=1 RAFTMAP_VM_GUEST=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /sys/fs/bpf
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
ip link set lo up
mkdir -p /etc
echo "127.0.0.1 localhost" >/etc/hosts
echo "vm-run: guest kernel $(uname -r)"
. /test/cmdline
status=$?
if [ "$status" -eq 0 ]; then
  printf '\nVM-RESULT: ok\n'
else
  printf '\nVM-RESULT: fail %s\n' "$status"
fi
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio --quiet -o -H newc -R 0:0) | gzip -1 >"$work/initramfs.gz"

# --foreground and </dev/null: Ctrl-C reaches qemu, and qemu leaves the terminal alone. sed drops
# the CRs and the escape sequences the firmware sends (one turns off the terminal's line wrap).
log=$work/console.log
: >"$log"
# A guest kernel that reports itself stuck (soft lockup, RCU stall) or oopses never recovers:
# the guest is stopped 10 s after the first report (time for every CPU's stack to be printed)
# instead of at the timeout.
stuck='watchdog: BUG: soft lockup|rcu: INFO: rcu_.* stall|Oops: |Kernel panic'
(
  while sleep 1; do
    if grep -qE "$stuck" "$log"; then
      sleep 10
      echo "vm-run: the guest kernel reported a fault (console above); stopping it" >&2
      kill "$(cat "$work/qemu.pid")" 2>/dev/null
      exit
    fi
  done
) &
watcher=$!
status=0
timeout --foreground -k 10 "${RAFTMAP_VM_TIMEOUT:-600}" \
  qemu-system-x86_64 -accel tcg -cpu qemu64 -smp 2 -m 4096 -nographic -no-reboot \
  -pidfile "$work/qemu.pid" -kernel "$kernel" -initrd "$work/initramfs.gz" \
  -append "console=ttyS0 panic=-1 quiet loglevel=5" -nic none </dev/null |
  sed -u 's/\x1bc/\n/g; s/\x1b[^a-zA-Z]*[a-zA-Z]//g; s/\r$//' | tee "$log" || status=$?
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
((status == 0)) || echo "vm-run: qemu exited with status $status (124: timed out)" >&2
grep -qx 'VM-RESULT: ok' "$log"
