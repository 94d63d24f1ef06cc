//! Histories: what clients asked for and what they were told, one event per line.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::lock::lock;

/// Whether an event starts an operation or tells how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The client sent the request.
    Invoke,
    /// It took effect, with this result.
    Ok,
    /// It certainly did not take effect (refused, or a compare-and-swap that did not match).
    Fail,
    /// Unknown: it may or may not have taken effect (timeout, connection lost).
    Info,
}

/// An operation on a register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "f", content = "value")]
pub enum Func {
    /// A read; the value is known when it completes (`None`: absent).
    Read(Option<i64>),
    Write(i64),
    /// Compare-and-swap: `[expected, new]`.
    Cas([i64; 2]),
    /// Removes the key (the kernel-map workload).
    Delete,
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The client: each runs one operation at a time.
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(flatten)]
    pub f: Func,
    /// The register (a key of the replicated map).
    pub key: u64,
    /// Nanoseconds since the start of the run.
    pub time: u64,
    /// The node whose kernel map was written (kernel-map workload only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
}

/// A history that does not make sense: the run that produced it is broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HistoryError {
    #[error("event {index}: process {process} completes an operation it never invoked")]
    Unmatched { index: usize, process: u64 },
    #[error("event {index}: process {process} invokes while its previous operation is open")]
    Overlapping { index: usize, process: u64 },
    #[error("event {index}: invoked {invoked:?}, completed as {completed:?}")]
    Mismatched {
        index: usize,
        invoked: Func,
        completed: Func,
    },
    #[error("line {line}: {error}")]
    Parse { line: usize, error: String },
}

/// An operation with its invocation and completion, as the checker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// Index of its invoke event in the history.
    pub id: usize,
    pub process: u64,
    pub key: u64,
    pub f: Func,
    pub call: u64,
    /// `None`: it never completed (or its outcome is unknown).
    pub ret: Option<u64>,
}

/// Pairs each invocation with its completion. Failed operations are dropped (they did not
/// happen); operations with an unknown outcome, or never completed, keep no return time.
pub fn operations(history: &[Event]) -> Result<Vec<Operation>, HistoryError> {
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut ops: Vec<Option<Operation>> = Vec::new();
    for (index, e) in history.iter().enumerate() {
        match e.kind {
            EventType::Invoke => {
                if open.contains_key(&e.process) {
                    return Err(HistoryError::Overlapping {
                        index,
                        process: e.process,
                    });
                }
                open.insert(e.process, ops.len());
                ops.push(Some(Operation {
                    id: index,
                    process: e.process,
                    key: e.key,
                    f: e.f.clone(),
                    call: e.time,
                    ret: None,
                }));
            }
            kind => {
                let slot = open.remove(&e.process).ok_or(HistoryError::Unmatched {
                    index,
                    process: e.process,
                })?;
                let Some(op) = ops[slot].as_mut() else {
                    continue;
                };
                let same = matches!(
                    (&op.f, &e.f),
                    (Func::Read(_), Func::Read(_))
                        | (Func::Write(_), Func::Write(_))
                        | (Func::Cas(_), Func::Cas(_))
                        | (Func::Delete, Func::Delete)
                );
                if !same {
                    return Err(HistoryError::Mismatched {
                        index,
                        invoked: op.f.clone(),
                        completed: e.f.clone(),
                    });
                }
                match kind {
                    EventType::Ok => {
                        op.ret = Some(e.time);
                        if let Func::Read(v) = e.f {
                            op.f = Func::Read(v);
                        }
                    }
                    EventType::Fail => ops[slot] = None,
                    // A read of unknown outcome tells nothing; a write may have happened.
                    EventType::Info if matches!(op.f, Func::Read(_)) => ops[slot] = None,
                    _ => {}
                }
            }
        }
    }
    // Reads never completed constrain nothing either.
    Ok(ops
        .into_iter()
        .flatten()
        .filter(|o| !(o.ret.is_none() && matches!(o.f, Func::Read(_))))
        .collect())
}

/// Parses a history written one JSON event per line.
pub fn parse(text: &str) -> Result<Vec<Event>, HistoryError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| HistoryError::Parse {
                line: i + 1,
                error: e.to_string(),
            })
        })
        .collect()
}

/// The history as it is recorded, shared by every client.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// When the run started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Adds events recorded elsewhere (the kernel maps' watchers).
    pub(crate) fn extend(&self, events: Vec<Event>) {
        lock(&self.events).extend(events);
    }

    /// Nanoseconds since the start of the run.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records an event; returns whether it left the outcome unknown.
    pub(crate) fn record(&self, process: u64, kind: EventType, key: u64, f: Func) -> bool {
        self.record_at(process, kind, key, f, None)
    }

    /// Records an event about node `node`'s kernel map (or the API when `None`).
    pub fn record_at(
        &self,
        process: u64,
        kind: EventType,
        key: u64,
        f: Func,
        node: Option<u64>,
    ) -> bool {
        let time = self.now();
        let mut events = lock(&self.events);
        events.push(Event {
            process,
            kind,
            f,
            key,
            time,
            node,
        });
        kind == EventType::Info
    }

    pub(crate) fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *lock(&self.events))
    }
}
