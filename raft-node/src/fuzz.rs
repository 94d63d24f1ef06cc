//! Entry points for the fuzz targets (`raft-node/fuzz/`) and their regression tests: each
//! decodes untrusted bytes the way the daemon does and runs the checks that follow, and must
//! return (an error is fine) whatever the bytes. Not an API.

use std::path::Path;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use raftmap_storage::{validate_batch, MapSchema, Proposal, TypeConfig};

use crate::network::SnapshotHeader;
use crate::peer_check::{self, PeerContext};

/// A peer message as each of the peer RPCs decodes it, then checked.
pub fn peer_message(data: &[u8]) {
    let ctx = PeerContext {
        sender: None,
        me: 2,
        retired: vec![9],
        committed: None,
    };
    if let Ok(v) = postcard::from_bytes::<VoteRequest<TypeConfig>>(data) {
        let _ = peer_check::check_vote(&ctx, &v.vote, v.last_log_id.as_ref());
    }
    if let Ok(a) = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(data) {
        let _ = peer_check::check_append(
            &ctx,
            &a.vote,
            a.prev_log_id.as_ref(),
            &a.entries,
            a.leader_commit.as_ref(),
        );
    }
    if let Ok(h) = postcard::from_bytes::<SnapshotHeader>(data) {
        let _ = peer_check::check_snapshot_header(&ctx, &h.vote, &h.meta);
    }
    if let Ok(p) = postcard::from_bytes::<Proposal>(data) {
        if p.check_size().is_ok() {
            for b in &p.batches {
                let _ = validate_batch(&b.ops, &schemas());
            }
        }
    }
}

/// Snapshot data received from a leader.
pub fn snapshot_data(data: &[u8]) {
    let _ = raftmap_storage::check_snapshot_data(data);
}

/// A client's write request as the API decodes, converts and validates it.
pub fn write_request(data: &[u8]) {
    use prost::Message;
    let Ok(req) = raftmap_proto::WriteRequest::decode(data) else {
        return;
    };
    let Ok(ops) = req
        .ops
        .into_iter()
        .map(crate::wire::op_from_pb)
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let _ = validate_batch(&ops, &schemas());
}

/// `identity.json`.
pub fn identity(data: &[u8]) {
    let _ = crate::identity::parse(data, Path::new("/nonexistent"), Some(3));
}

/// `kernel-maps.json`.
pub fn kernel_map_ids(data: &[u8]) {
    let _ = crate::kernel::parse_recorded_ids(data);
}

/// A capture ring-buffer record.
pub fn capture_record(data: &[u8]) {
    let _ = raftmap_ebpf_hooks::parse_record(data);
}

fn schemas() -> std::collections::BTreeMap<String, MapSchema> {
    let mut m = std::collections::BTreeMap::new();
    for s in [
        MapSchema::hash("m", 8, 8, 16),
        MapSchema {
            map_type: raftmap_storage::MapType::Array,
            ..MapSchema::hash("a", 4, 4, 16)
        },
    ] {
        m.insert(s.name.clone(), s);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzzers found or that stand for a class of them: every entry point takes them
    /// without panicking. (One file per input under `fuzz/regressions/<target>/`.)
    #[test]
    fn the_fuzzers_findings_stay_fixed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 6] = [
            ("peer_message", peer_message),
            ("snapshot_data", snapshot_data),
            ("write_request", write_request),
            ("identity", identity),
            ("kernel_map_ids", kernel_map_ids),
            ("capture_record", capture_record),
        ];
        let mut ran = 0;
        for (name, target) in targets {
            let Ok(entries) = std::fs::read_dir(dir.join(name)) else {
                continue;
            };
            for e in entries {
                let bytes = std::fs::read(e.unwrap().path()).unwrap();
                target(&bytes);
                ran += 1;
            }
        }
        // Every target also takes the classic edge inputs.
        for (_, target) in targets {
            for input in [&[][..], &[0], &[0xff; 64], &[0x80; 300]] {
                target(input);
                ran += 1;
            }
        }
        assert!(ran >= 24);
    }
}
