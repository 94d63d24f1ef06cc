//! The raftmap node: openraft over gRPC on top of `raftmap-storage`, with group commit, leader
//! forwarding, linearizable reads (read-index), the client and admin APIs, and metrics.
//!
//! ```text
//! client ─Kv.Write─> Batcher (group commit) ─> Proposer ─┬─ leader: raft.client_write
//!                                                        └─ otherwise: Peer.Propose to the leader
//! openraft ─Peer.{PreVote,Vote,AppendEntries,InstallSnapshot}─> other nodes
//! committed entries ─> StateMachine (RocksDB) ─> StateView (reads, watch)
//! ```
//!
//! The public API is small: [`RunningNode`] (start a node from a [`NodeConfig`]), [`Client`]
//! (talk to a cluster), [`tls`] (the certificates a process connects and serves with, and
//! making them) and [`launcher`] (run several nodes as processes on loopback).

mod autopilot;
mod bootstrap;
mod client;
mod consistency;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod http;
mod identity;
mod join;
mod kernel;
pub mod launcher;
mod lock;
mod metrics;
mod network;
mod node;
mod peer_check;
mod pool;
mod propose;
mod provision;
mod service;
mod shared;
pub mod tls;
mod wire;

pub use autopilot::Silence;
pub use client::{put, Client};
pub use error::{NodeError, Result};
pub use identity::NodeIdSetting;
pub use kernel::{CaptureBackend, WatchSpec};
pub use network::endpoint;
pub use node::{NodeConfig, RunningNode};
pub use propose::BatchConfig;
pub use raftmap_proto as proto;
pub use raftmap_storage as storage;
