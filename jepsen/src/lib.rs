//! raftmap's fault-injection harness, after Jepsen. This first part holds the histories a run
//! records (one JSON event per line: process, invoke/ok/fail/info, function, value, time) and
//! the linearizability checker that judges them, per key. The cluster under test, workloads and
//! nemeses come next.

pub mod checker;
pub mod history;

pub use checker::{check, check_key, Verdict};
pub use history::{operations, parse, Event, EventType, Func, HistoryError, Operation};
