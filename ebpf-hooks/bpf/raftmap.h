// SPDX-License-Identifier: GPL-2.0
// What raftmap's capture programs share: the event user space reads (parsed by
// ebpf-hooks/src/capture.rs, which must match this layout), the watched-map set, the ring
// buffer and the loss counters.
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define RM_MAX_KEY 128
#define RM_MAX_VALUE 1024
#define RM_MAX_WATCHED 256

#define RM_OP_UPDATE 1
#define RM_OP_DELETE 2
#define RM_OP_EVICT 3

// Only the fields read; relocated against the running kernel's BTF (CO-RE).
struct bpf_map {
	__u32 key_size;
	__u32 value_size;
	__u32 id;
} __attribute__((preserve_access_index));

// A record may end right after the value's value_size bytes (the syscall backend sends no
// more); the fexit backend reserves the whole struct.
struct rm_event {
	__u32 map_id;
	__u32 op;
	__u32 key_size;
	__u32 value_size;
	__u64 pid_tgid;
	__u8 key[RM_MAX_KEY];
	__u8 value[RM_MAX_VALUE];
};

// Ids of the kernel maps raftmap watches (set by user space).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RM_MAX_WATCHED);
	__type(key, __u32);
	__type(value, __u8);
} rm_watched SEC(".maps");

// 16 MiB: about 100k syscall-backend records of an 8-byte key and value, half a second of a
// writer flat out while the daemon is busy committing (4 MiB lost a fifth of them).
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024 * 1024);
} rm_events SEC(".maps");

// Whether the reader sleeps waiting for records: set to 1 by the reader (mapped into its memory)
// just before it sleeps, cleared by the record that wakes it. Records are committed without a
// wakeup and wake the reader only when it waits: a reader that is busy or pausing between
// batches is never woken (each wakeup costs the writer an interrupt, a VM exit on a guest).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
} rm_reader_waits SEC(".maps");

// [0]: events lost (ring buffer full, unreadable memory, in-flight table full);
// [1]: changes seen but not forwarded (batch syscalls, oversize keys or values).
// Either moving makes user space scan the watched maps at once.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} rm_drops SEC(".maps");

static __always_inline void rm_count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&rm_drops, &which);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline bool rm_is_watched(__u32 map_id)
{
	return bpf_map_lookup_elem(&rm_watched, &map_id) != 0;
}

// Call after committing a record with BPF_RB_NO_WAKEUP: wakes the reader if it waits, with an
// empty record (user space skips records shorter than an event). The exchange is a locked
// instruction: the committed record is visible before the flag is read, and the reader sets
// the flag before it looks at the ring one last time, so one side always sees the other.
static __always_inline void rm_wake_reader(void)
{
	__u32 zero = 0;
	__u32 *waits = bpf_map_lookup_elem(&rm_reader_waits, &zero);
	if (waits && __sync_lock_test_and_set(waits, 0)) {
		__u64 nudge = 0;
		bpf_ringbuf_output(&rm_events, &nudge, sizeof(nudge), BPF_RB_FORCE_WAKEUP);
	}
}

// Whether a map's keys and values fit an event; counts the change as not forwarded if not.
static __always_inline bool rm_sizes_fit(__u32 ks, __u32 vs)
{
	if (ks == 0 || ks > RM_MAX_KEY || vs > RM_MAX_VALUE) {
		rm_count(1);
		return false;
	}
	return true;
}
