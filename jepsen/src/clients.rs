//! The register and set workloads' clients: operations one at a time against one member,
//! recorded in the history with how each ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmap_node::proto as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::history::{EventType, Func, Recorder};
use crate::keys::KeyPool;
use crate::nemesis::Members;

/// The replicated map the register and set workloads use.
pub const MAP: &str = "jepsen_register";

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Reads, writes and compare-and-swaps on a few keys; checked for linearizability.
    Register,
    /// Adds of unique elements, then a final read; checked for lost and unexpected elements.
    Set,
    /// Updates and deletes written straight into the kernel maps of random nodes; checked for
    /// convergence, order (per node, a subsequence of the log) and lost writes.
    #[serde(rename = "kernel-map")]
    KernelMap,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "register" => Ok(Workload::Register),
            "set" => Ok(Workload::Set),
            "kernel-map" => Ok(Workload::KernelMap),
            other => Err(format!(
                "unknown workload {other:?}: expected register, set or kernel-map"
            )),
        }
    }
}

pub(crate) fn key_bytes(k: u64) -> Vec<u8> {
    k.to_be_bytes().to_vec()
}

pub(crate) fn value_of(v: &[u8]) -> Option<i64> {
    v.try_into().ok().map(i64::from_be_bytes)
}

/// How a call ended, for the history: a definite refusal is `Fail`, anything that leaves the
/// outcome open (timeout, unavailable, lost connection) is `Info`.
fn classify(s: &tonic::Status) -> EventType {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            EventType::Fail
        }
        _ => EventType::Info,
    }
}

/// A call bounded on the client side too: a paused server never answers, whatever the
/// deadline it was sent.
async fn within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
}

/// Sends a one-operation write batch; how it ended, for the history.
async fn write_one(
    kv: &mut pb::kv_client::KvClient<tonic::transport::Channel>,
    op: pb::op::Op,
    timeout: Duration,
) -> EventType {
    let mut req = tonic::Request::new(pb::WriteRequest {
        ops: vec![pb::Op { op: Some(op) }],
    });
    req.set_timeout(timeout);
    match within(timeout, kv.write(req)).await {
        Ok(r) if r.get_ref().succeeded => EventType::Ok,
        // A compare-and-swap that did not match changed nothing.
        Ok(_) => EventType::Fail,
        Err(s) => classify(&s),
    }
}

fn put(key: Vec<u8>, value: i64) -> pb::op::Op {
    pb::op::Op::Put(pb::Put {
        map: MAP.into(),
        key,
        value: value.to_be_bytes().to_vec(),
    })
}

/// A client's connection to one member.
fn connect(
    members: &Members,
    pick: usize,
) -> Option<pb::kv_client::KvClient<tonic::transport::Channel>> {
    let (_, addr) = members.endpoint(pick)?;
    let ch = members
        .security
        .channel(&addr, raftmap_node::tls::Expect::AnyNode)
        .ok()?;
    Some(pb::kv_client::KvClient::new(ch))
}

/// One client: operations one at a time against one member, until `deadline`; after an
/// operation of unknown outcome it moves to another member (the one it used may be down, cut
/// off or removed).
pub(crate) async fn client(
    process: u64,
    members: Arc<Members>,
    workload: Workload,
    keys: Arc<KeyPool>,
    seed: u64,
    deadline: Instant,
    rec: Arc<Recorder>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pick = process as usize;
    let Some(mut kv) = connect(&members, pick) else {
        return;
    };
    let mut last_unknown = false;
    let mut added: i64 = 0;
    while Instant::now() < deadline {
        if std::mem::take(&mut last_unknown) {
            // Do not spin on a node that is down or unreachable.
            tokio::time::sleep(Duration::from_millis(50)).await;
            pick = pick.wrapping_add(1 + rng.gen_range(0..4));
            if let Some(c) = connect(&members, pick) {
                kv = c;
            }
        }
        let key = keys.next(rng.gen());
        let op = match workload {
            Workload::Register => rng.gen_range(0..3),
            Workload::Set | Workload::KernelMap => 3,
        };
        let timeout = Duration::from_secs(2);
        match op {
            0 => {
                let _ = rec.record(process, EventType::Invoke, key, Func::Read(None));
                let mut req = tonic::Request::new(pb::GetRequest {
                    map: MAP.into(),
                    key: key_bytes(key),
                    consistency: pb::Consistency::Linearizable as i32,
                });
                req.set_timeout(timeout);
                match within(timeout, kv.get(req)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let v = if r.found { value_of(&r.value) } else { None };
                        let _ = rec.record(process, EventType::Ok, key, Func::Read(v));
                    }
                    Err(s) => {
                        last_unknown = rec.record(process, classify(&s), key, Func::Read(None))
                    }
                }
            }
            1 => {
                let v = rng.gen_range(0..5);
                let _ = rec.record(process, EventType::Invoke, key, Func::Write(v));
                let kind = write_one(&mut kv, put(key_bytes(key), v), timeout).await;
                last_unknown = rec.record(process, kind, key, Func::Write(v));
                if last_unknown {
                    keys.unknown(key);
                }
            }
            3 => {
                // A unique element: the process and its own counter.
                added += 1;
                let element = (process as i64) * 1_000_000_000 + added;
                let _ = rec.record(process, EventType::Invoke, 0, Func::Write(element));
                let op = put(element.to_be_bytes().to_vec(), 1);
                let kind = write_one(&mut kv, op, timeout).await;
                last_unknown = rec.record(process, kind, 0, Func::Write(element));
            }
            _ => {
                let (from, to) = (rng.gen_range(0..5), rng.gen_range(0..5));
                let f = Func::Cas([from, to]);
                let _ = rec.record(process, EventType::Invoke, key, f.clone());
                let op = pb::op::Op::Cas(pb::CompareAndSwap {
                    map: MAP.into(),
                    key: key_bytes(key),
                    expected: Some(from.to_be_bytes().to_vec()),
                    new_value: Some(to.to_be_bytes().to_vec()),
                });
                let kind = write_one(&mut kv, op, timeout).await;
                last_unknown = rec.record(process, kind, key, f);
                if last_unknown {
                    keys.unknown(key);
                }
            }
        }
    }
}
