// SPDX-License-Identifier: GPL-2.0
// A minimal connection tracker: the kind of stateful program raftmap exists for. For every IPv4
// TCP or UDP packet it records the flow in the LRU hash `ct`: a new flow is inserted with
// bpf_map_update_elem, a known one is updated in place through the pointer from the lookup
// (a write no map hook can see; raftmap's scan catches it), and a TCP FIN or RST removes the
// flow with bpf_map_delete_elem.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_val {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
} ct SEC(".maps");

struct ports {
	__u16 source;
	__u16 dest;
};

// The start of a TCP header, up to the flags.
struct tcp_start {
	__u16 source;
	__u16 dest;
	__u32 seq;
	__u32 ack_seq;
	__u8 doff;
	__u8 flags;
};

#define RM_TCP_FIN 0x01
#define RM_TCP_RST 0x04

SEC("xdp")
int ct_track(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5)
		return XDP_PASS;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct ports *p = (void *)(ip + 1);
	if ((void *)(p + 1) > end)
		return XDP_PASS;

	struct ct_key key = {
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = p->source,
		.dport = p->dest,
		.proto = ip->protocol,
	};
	if (ip->protocol == IPPROTO_TCP) {
		struct tcp_start *t = (void *)(ip + 1);
		if ((void *)(t + 1) <= end && (t->flags & (RM_TCP_FIN | RM_TCP_RST))) {
			bpf_map_delete_elem(&ct, &key);
			return XDP_PASS;
		}
	}
	__u64 len = end - data;
	struct ct_val *v = bpf_map_lookup_elem(&ct, &key);
	if (v) {
		__sync_fetch_and_add(&v->packets, 1);
		__sync_fetch_and_add(&v->bytes, len);
	} else {
		struct ct_val init = { .packets = 1, .bytes = len };
		bpf_map_update_elem(&ct, &key, &init, BPF_NOEXIST);
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
