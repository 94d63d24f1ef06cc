//! raftmap's fault-injection harness, after Jepsen: a cluster of real `raftmap agent`
//! processes in network namespaces, clients recording a history (one JSON event per line:
//! process, invoke/ok/fail/info, function, value, time), a nemesis injecting faults
//! (partitions, kills, pauses, membership changes, overlapping), and the checkers: per-key
//! linearizability with shrinking, lost and unexpected set elements, kernel-map convergence
//! and order.

pub mod availability;

pub mod checker;
mod clients;
pub mod cluster;
pub mod error;
pub mod history;
pub mod kernel_map;
pub mod keys;
mod lock;
pub mod nemesis;
pub mod plot;
pub mod run;
mod set_check;

pub use checker::{check, check_key, check_key_within, Budget, Verdict};
pub use history::{operations, parse, Event, EventType, Func, HistoryError, Operation};
