//! raftmap's fault-injection harness, after Jepsen: a cluster of real `raftmap agent`
//! processes, clients recording a history of register operations (one JSON event per line:
//! process, invoke/ok/fail/info, function, value, time), a nemesis injecting faults, and a
//! per-key linearizability checker that judges the history.

pub mod checker;
pub mod history;
pub mod plot;
pub mod run;

pub use checker::{check, check_key, Verdict};
pub use history::{operations, parse, Event, EventType, Func, HistoryError, Operation};
