//! The gRPC services, one file each: `peer.rs` (between nodes: Raft messages, snapshots,
//! forwarded proposals), `kv.rs` (clients: writes, reads, dumps, watches) and `admin.rs`
//! (operators: init, membership, map drop, status). Protobuf conversions are in `wire.rs`.

mod admin;
mod authz;
mod kv;
mod peer;

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Response, Status};

pub(crate) use admin::{remove_member, AdminService, REASON_HEADER, REASON_RETIRED};
pub(crate) use authz::{
    check_self, AuthzLayer, Granted, Port, CLUSTER_HEADER, FORWARDED_FOR_HEADER, FROM_HEADER,
    TO_HEADER,
};
pub(crate) use kv::KvService;
pub(crate) use peer::PeerService;

/// Default and largest dump page.
pub(super) const DUMP_PAGE: usize = 1000;
/// Most key and value bytes in one dump or watch page (one larger entry still goes alone),
/// well under the largest client message.
pub(super) const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Fewest voters `remove` leaves without `--force`: a majority of three survives one failure.
pub(super) const MIN_VOTERS: usize = 3;
/// A learner within this many entries of the leader may be promoted.
pub(super) const DEFAULT_MAX_LAG: u64 = 1000;

pub(super) type GrpcResult<T> = Result<Response<T>, Status>;
pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
