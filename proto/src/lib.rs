//! raftmap's gRPC protocol, generated from `proto/raftmap.proto` by tonic and prost: the peer
//! service nodes use among themselves (Raft RPCs, forwarded proposals, read-index), the client
//! `Kv` service and the `Admin` service.

#![allow(missing_debug_implementations, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("raftmap.v1");
}

pub use v1::*;
