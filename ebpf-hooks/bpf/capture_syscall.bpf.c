// SPDX-License-Identifier: GPL-2.0
// raftmap's `syscall` capture backend: sees every successful bpf(2) map update and delete made
// by any process other than raftmap itself, on the maps raftmap watches, with the full key and
// value bytes. For kernels that refuse fentry/fexit programs. BPF programs' own map writes are
// not syscalls; the scan backend covers them.
//
// One program at sys_exit: a bpf(2) call that returned 0 with an element command on a watched
// map is forwarded with its key and value, read from the caller's memory (the attr, key and
// value buffers are the caller's and still in place when its syscall returns). Records are as
// long as the value (header, key slot, value), not the largest possible event. CO-RE: the few
// kernel structures used are declared here with only the fields read, and relocated against
// the running kernel's BTF at load time.

#include <stdbool.h>
#include <stddef.h>
#include "raftmap.h"
#include <bpf/bpf_tracing.h>

// bpf(2) commands (uapi enum bpf_cmd).
#define RM_MAP_UPDATE_ELEM 2
#define RM_MAP_DELETE_ELEM 3
#define RM_MAP_LOOKUP_AND_DELETE_ELEM 21
#define RM_MAP_UPDATE_BATCH 26
#define RM_MAP_DELETE_BATCH 27
#define RM_NR_BPF 321 /* x86_64 */

// ---- kernel structures, only the fields used (CO-RE relocated) ----
struct pt_regs {
	unsigned long di;
	unsigned long si;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

struct file {
	void *private_data;
} __attribute__((preserve_access_index));

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

struct task_struct {
	struct files_struct *files;
} __attribute__((preserve_access_index));

// The part of union bpf_attr the element commands use (uapi layout, stable).
struct rm_elem_attr {
	__u32 map_fd;
	__u32 pad;
	__u64 key;
	__u64 value;
	__u64 flags;
};

// The part of union bpf_attr the batch commands use.
struct rm_batch_attr {
	__u64 in_batch;
	__u64 out_batch;
	__u64 keys;
	__u64 values;
	__u32 count;
	__u32 map_fd;
};

// raftmap's own process: its applier's writes are not captured (no echo).
const volatile __u32 rm_self_tgid = 0;

// Scratch space to build an event (too large for the BPF stack).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rm_event);
} rm_scratch SEC(".maps");

static __always_inline struct bpf_map *rm_map_of_fd(__u32 fd)
{
	// Direct loads through BTF pointers (checked by the verifier, no helper calls) as far as
	// the fd array; its elements and what they point to are read with helpers.
	struct task_struct *task = bpf_get_current_task_btf();
	struct files_struct *files = task->files;
	if (!files)
		return 0;
	struct fdtable *fdt = files->fdt;
	if (!fdt || fd >= fdt->max_fds)
		return 0;
	struct file **fds = fdt->fd;
	struct file *f = 0;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return 0;
	return BPF_CORE_READ(f, private_data);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(rm_sys_exit, struct pt_regs *regs, long ret)
{
	// Only successful operations count: a failed update changed nothing.
	if (ret != 0 || regs->orig_ax != RM_NR_BPF)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if ((__u32)(pid_tgid >> 32) == rm_self_tgid)
		return 0;
	long cmd = regs->di;
	if (cmd != RM_MAP_UPDATE_ELEM && cmd != RM_MAP_DELETE_ELEM &&
	    cmd != RM_MAP_LOOKUP_AND_DELETE_ELEM && cmd != RM_MAP_UPDATE_BATCH &&
	    cmd != RM_MAP_DELETE_BATCH)
		return 0;

	bool batch = cmd == RM_MAP_UPDATE_BATCH || cmd == RM_MAP_DELETE_BATCH;
	struct rm_elem_attr attr = {};
	struct rm_batch_attr battr = {};
	if (batch ? bpf_probe_read_user(&battr, sizeof(battr), (void *)regs->si)
		  : bpf_probe_read_user(&attr, sizeof(attr), (void *)regs->si))
		return 0;
	struct bpf_map *map = rm_map_of_fd(batch ? battr.map_fd : attr.map_fd);
	if (!map)
		return 0;
	__u32 map_id = BPF_CORE_READ(map, id);
	if (!rm_is_watched(map_id))
		return 0;
	if (batch) {
		// Not decoded element by element (yet): the scan picks the changes up.
		rm_count(1);
		return 0;
	}

	__u32 zero = 0;
	struct rm_event *ev = bpf_map_lookup_elem(&rm_scratch, &zero);
	if (!ev)
		return 0;
	__u32 ks = BPF_CORE_READ(map, key_size);
	__u32 vs = cmd == RM_MAP_UPDATE_ELEM ? BPF_CORE_READ(map, value_size) : 0;
	if (!rm_sizes_fit(ks, vs))
		return 0;
	ev->map_id = map_id;
	ev->pid_tgid = pid_tgid;
	ev->key_size = ks;
	ev->value_size = vs;
	ev->op = cmd == RM_MAP_UPDATE_ELEM ? RM_OP_UPDATE : RM_OP_DELETE;
	if (bpf_probe_read_user(ev->key, ks, (void *)attr.key) ||
	    (vs && bpf_probe_read_user(ev->value, vs, (void *)attr.value))) {
		rm_count(0);
		return 0;
	}
	// Bounded for the verifier by rm_sizes_fit: at most sizeof(*ev).
	__u64 len = offsetof(struct rm_event, value) + (vs & (RM_MAX_VALUE * 2 - 1));
	if (len > sizeof(*ev))
		return 0;
	if (bpf_ringbuf_output(&rm_events, ev, len, BPF_RB_NO_WAKEUP)) {
		rm_count(0);
		return 0;
	}
	rm_wake_reader();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
