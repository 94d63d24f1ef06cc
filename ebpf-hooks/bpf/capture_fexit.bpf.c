// SPDX-License-Identifier: GPL-2.0
// raftmap's `fexit` capture backend: runs after the kernel's hash map operations return, so it
// sees every change to a watched map whoever makes it (bpf(2) syscalls, BPF programs, batch
// commands, which call the same operations), and reports only the successful ones (return 0).
// LRU evictions are reported from htab_lru_map_delete_node, which returns true when it removed
// an element. CO-RE: `struct bpf_map` and the hash table element differ between kernels (and
// the operations return long on newer kernels, int on older ones: the return value is cast to
// 32 bits).

#include <stdbool.h>
#include "raftmap.h"
#include <bpf/bpf_tracing.h>

struct bpf_htab {
	struct bpf_map map;
} __attribute__((preserve_access_index));

struct bpf_lru_node {
	__u8 ref;
} __attribute__((preserve_access_index));

// The kernel's element: fields found by name (they sit in anonymous unions there).
struct htab_elem {
	struct bpf_lru_node lru_node;
	__u32 hash;
	char key[];
} __attribute__((preserve_access_index));

static __always_inline int rm_emit(struct bpf_map *map, __u32 op, const void *key, const void *value)
{
	__u32 id = BPF_CORE_READ(map, id);
	if (!rm_is_watched(id))
		return 0;
	__u32 ks = BPF_CORE_READ(map, key_size);
	__u32 vs = op == RM_OP_UPDATE ? BPF_CORE_READ(map, value_size) : 0;
	if (!rm_sizes_fit(ks, vs))
		return 0;
	struct rm_event *ev = bpf_ringbuf_reserve(&rm_events, sizeof(*ev), 0);
	if (!ev) {
		rm_count(0);
		return 0;
	}
	ev->map_id = id;
	ev->op = op;
	ev->key_size = ks;
	ev->value_size = vs;
	ev->pid_tgid = bpf_get_current_pid_tgid();
	if (bpf_probe_read_kernel(ev->key, ks, key) ||
	    (vs && bpf_probe_read_kernel(ev->value, vs, value))) {
		bpf_ringbuf_discard(ev, 0);
		rm_count(0);
		return 0;
	}
	bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	rm_wake_reader();
	return 0;
}

SEC("fexit/htab_map_update_elem")
int BPF_PROG(rm_htab_update, struct bpf_map *map, void *key, void *value, __u64 flags, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_UPDATE, key, value);
	return 0;
}

SEC("fexit/htab_lru_map_update_elem")
int BPF_PROG(rm_lru_update, struct bpf_map *map, void *key, void *value, __u64 flags, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_UPDATE, key, value);
	return 0;
}

SEC("fexit/htab_map_delete_elem")
int BPF_PROG(rm_htab_delete, struct bpf_map *map, void *key, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_DELETE, key, 0);
	return 0;
}

SEC("fexit/htab_lru_map_delete_elem")
int BPF_PROG(rm_lru_delete, struct bpf_map *map, void *key, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_DELETE, key, 0);
	return 0;
}

SEC("fexit/htab_map_lookup_and_delete_elem")
int BPF_PROG(rm_htab_lookup_delete, struct bpf_map *map, void *key, void *value, __u64 flags, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_DELETE, key, 0);
	return 0;
}

SEC("fexit/htab_lru_map_lookup_and_delete_elem")
int BPF_PROG(rm_lru_lookup_delete, struct bpf_map *map, void *key, void *value, __u64 flags, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_DELETE, key, 0);
	return 0;
}

SEC("fexit/array_map_update_elem")
int BPF_PROG(rm_array_update, struct bpf_map *map, void *key, void *value, __u64 flags, long ret)
{
	if ((int)ret == 0)
		rm_emit(map, RM_OP_UPDATE, key, value);
	return 0;
}

// An LRU map evicting an element to make room: the element's key is reported as evicted.
SEC("fexit/htab_lru_map_delete_node")
int BPF_PROG(rm_lru_evict, void *arg, struct bpf_lru_node *node, long ret)
{
	if (!(ret & 0xff)) /* bool */
		return 0;
	struct bpf_htab *htab = arg;
	void *elem = (void *)node - bpf_core_field_offset(struct htab_elem, lru_node);
	void *key = elem + bpf_core_field_offset(struct htab_elem, key);
	rm_emit(&htab->map, RM_OP_EVICT, key, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
