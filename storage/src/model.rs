//! The replicated data model: map schemas, operations, log payloads and their validation.
//!
//! Everything in this module is deterministic: the same proposal validated against the same
//! schemas gives the same verdict on every node, which is what lets the state machine reject a
//! bad batch identically everywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

openraft::declare_raft_types!(
    /// openraft type configuration of raftmap.
    pub TypeConfig:
        D = Proposal,
        R = ApplyResult,
        NodeId = NodeId,
        Node = NodeInfo,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Cluster-unique, never-reused node identifier.
pub type NodeId = u64;
/// The openraft handle specialised to raftmap.
pub type Raft = openraft::Raft<TypeConfig, crate::StateMachine>;
/// A log id (term, leader, index).
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// Stored membership (log id of the config entry plus the membership).
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// A vote (term, candidate, committed).
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A snapshot as openraft passes it around: metadata plus the encoded state.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// Longest map name accepted.
pub const MAX_MAP_NAME: usize = 64;
/// Largest key size a map may declare (the BPF stack limit for a key built in a program).
pub const MAX_KEY_SIZE: u32 = 512;
/// Largest value size a map may declare.
pub const MAX_VALUE_SIZE: u32 = 64 * 1024;
/// Largest `max_entries` a map may declare.
pub const MAX_ENTRIES: u32 = 1 << 24;
/// Most operations accepted in one client batch.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Most key and value bytes accepted in one client batch.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most bytes of actual values listed in a failed compare-and-swap's answer (the first
/// mismatch is always listed).
pub const MAX_CAS_REPLY_BYTES: usize = 1024 * 1024;
/// Most client operations in one log entry (group commit stays within it).
pub const MAX_PROPOSAL_OPS: usize = 2 * MAX_BATCH_OPS;
/// Most key and value bytes in one log entry.
pub const MAX_PROPOSAL_BYTES: usize = 2 * MAX_BATCH_BYTES;
/// Most client batches in one log entry.
pub const MAX_PROPOSAL_BATCHES: usize = MAX_PROPOSAL_OPS;
/// Most administrative records in one log entry (raftmap writes one at a time).
pub const MAX_PROPOSAL_ADMIN: usize = 16;
/// Most maps a cluster holds.
pub const MAX_MAPS: usize = 1024;

/// How a node is reached: its peer (Raft) address and its client API address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub raft_addr: String,
    pub api_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

/// Kernel map type a replicated map mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapType {
    Hash,
    LruHash,
    Array,
}

impl fmt::Display for MapType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapType::Hash => "hash",
            MapType::LruHash => "lru_hash",
            MapType::Array => "array",
        })
    }
}

impl std::str::FromStr for MapType {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hash" => Ok(MapType::Hash),
            "lru_hash" | "lru" => Ok(MapType::LruHash),
            "array" => Ok(MapType::Array),
            other => Err(ValidationError::UnknownMapType(other.to_string())),
        }
    }
}

/// The schema of a named map. Maps are identified across the cluster by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapSchema {
    pub name: String,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl fmt::Display for MapSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}({}, key {} B, value {} B, max {} entries)",
            self.name, self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

impl MapSchema {
    /// A hash map's schema.
    pub fn hash(name: &str, key_size: u32, value_size: u32, max_entries: u32) -> Self {
        Self {
            name: name.to_string(),
            map_type: MapType::Hash,
            key_size,
            value_size,
            max_entries,
        }
    }

    /// Checks that the schema itself is well formed.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_map_name(&self.name)?;
        let bad = |reason: String| ValidationError::BadSchema {
            map: self.name.clone(),
            reason,
        };
        if self.key_size == 0 || self.key_size > MAX_KEY_SIZE {
            return Err(bad(format!(
                "key size {} is not in 1..={MAX_KEY_SIZE}",
                self.key_size
            )));
        }
        if self.value_size == 0 || self.value_size > MAX_VALUE_SIZE {
            return Err(bad(format!(
                "value size {} is not in 1..={MAX_VALUE_SIZE}",
                self.value_size
            )));
        }
        if self.max_entries == 0 || self.max_entries > MAX_ENTRIES {
            return Err(bad(format!(
                "max entries {} is not in 1..={MAX_ENTRIES}",
                self.max_entries
            )));
        }
        if self.map_type == MapType::Array && self.key_size != 4 {
            return Err(bad(format!(
                "an array map has 4-byte keys, not {}",
                self.key_size
            )));
        }
        Ok(())
    }
}

/// Checks a map name: 1 to 64 characters from `[A-Za-z0-9_.-]`.
pub fn validate_map_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_MAP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadMapName(name.to_string()))
    }
}

/// One operation of a client batch.
///
/// Keys and values are (de)serialized as byte strings (`serde_bytes`): in postcard the same
/// bytes as a sequence of `u8` (a length, then the bytes), copied whole instead of byte by byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a map, or confirm that it exists with exactly this schema.
    DeclareMap(MapSchema),
    /// Insert or overwrite a key.
    Put {
        map: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove a key (removing an absent key is not an error).
    Delete {
        map: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Condition the whole batch on the key's current value (`None`: the key must be absent),
    /// then set it to `new` (`None`: delete it).
    CompareAndSwap {
        map: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new: Option<Vec<u8>>,
    },
    /// Remove a map: its schema and every entry. Alone in its batch. (Added last: the
    /// variants before it keep their encoding.)
    DropMap { map: String },
}

impl Op {
    /// Key and value bytes, as the batch size limit counts them.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::DeclareMap(_) | Op::DropMap { .. } => 0,
            Op::Put { key, value, .. } => key.len() + value.len(),
            Op::Delete { key, .. } => key.len(),
            Op::CompareAndSwap {
                key, expected, new, ..
            } => {
                key.len() + expected.as_ref().map_or(0, Vec::len) + new.as_ref().map_or(0, Vec::len)
            }
        }
    }
}

/// Where a client batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A client of the API.
    Api,
    /// Captured from the origin node's kernel maps: that node's maps already hold it.
    Kernel,
}

/// A batch submitted by one client: applied atomically (all operations or none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientBatch {
    /// Node that captured or received the batch.
    pub origin: NodeId,
    /// Per-origin sequence number, increasing.
    pub seq: u64,
    pub source: Source,
    pub ops: Vec<Op>,
}

/// Administrative records that must be part of the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    /// First entry of a cluster: its identity.
    InitCluster { cluster_id: String },
    /// A node left the membership; its id may never be used again.
    RetireNode { node_id: NodeId },
    /// The name of the host a member runs on (`raftmap members` shows it next to the id).
    NameNode { node_id: NodeId, name: String },
}

/// The application payload of one log entry: everything group commit coalesced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub batches: Vec<ClientBatch>,
    pub admin: Vec<AdminOp>,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} batches, {} operations, {} admin records",
            self.batches.len(),
            self.op_count(),
            self.admin.len()
        )
    }
}

impl Proposal {
    /// Number of client operations carried.
    pub fn op_count(&self) -> usize {
        self.batches.iter().map(|b| b.ops.len()).sum()
    }

    /// Checks what can be checked without the state: every batch within the client batch
    /// limits, and the entry within the log entry limits. A proposal from the network is
    /// checked before it is appended.
    pub fn check_size(&self) -> Result<(), ValidationError> {
        let too_large = |what: &str, actual: usize, limit: usize| {
            Err(ValidationError::BatchTooLarge {
                what: what.into(),
                actual,
                limit,
            })
        };
        if self.batches.len() > MAX_PROPOSAL_BATCHES {
            return too_large(
                "client batches in one entry",
                self.batches.len(),
                MAX_PROPOSAL_BATCHES,
            );
        }
        if self.admin.len() > MAX_PROPOSAL_ADMIN {
            return too_large(
                "administrative records",
                self.admin.len(),
                MAX_PROPOSAL_ADMIN,
            );
        }
        let (mut ops, mut bytes) = (0usize, 0usize);
        for b in &self.batches {
            check_batch_size(&b.ops)?;
            ops += b.ops.len();
            bytes += b.ops.iter().map(Op::payload_bytes).sum::<usize>();
        }
        if ops > MAX_PROPOSAL_OPS {
            return too_large("operations in one entry", ops, MAX_PROPOSAL_OPS);
        }
        if bytes > MAX_PROPOSAL_BYTES {
            return too_large("bytes in one entry", bytes, MAX_PROPOSAL_BYTES);
        }
        for a in &self.admin {
            if let AdminOp::NameNode { name, .. } = a {
                if name.len() > MAX_NODE_NAME {
                    return too_large("bytes in a node name", name.len(), MAX_NODE_NAME);
                }
            }
        }
        Ok(())
    }
}

/// What happened to one client batch when its entry was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOutcome {
    /// Every operation took effect.
    Applied,
    /// A compare-and-swap did not match; nothing took effect. Lists `(op index, actual value)`
    /// of the mismatches, in order, while their values fit [`MAX_CAS_REPLY_BYTES`]; `omitted`
    /// more are not listed.
    CasFailed {
        mismatches: Vec<(u32, Option<Vec<u8>>)>,
        omitted: u32,
    },
    /// The batch was invalid against the state at apply time; nothing took effect.
    Rejected(ValidationError),
}

/// The state machine's response to one log entry: one outcome per client batch, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    pub outcomes: Vec<BatchOutcome>,
}

/// Replicated facts about the cluster itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: Option<String>,
    /// Node ids that were removed and must never be reused.
    pub retired: Vec<NodeId>,
    /// The name each member runs on (a Kubernetes node name, a host name), as it joined. Not
    /// part of the derived encoding: it travels after everything else (see
    /// [`ClusterInfo::encode`]), so that data written before names existed reads unchanged.
    #[serde(skip)]
    pub names: BTreeMap<NodeId, String>,
}

/// Longest node name a member may record (a DNS name's limit, as a Kubernetes node name's).
pub const MAX_NODE_NAME: usize = 253;

impl ClusterInfo {
    /// The stored form: the derived encoding, then the names. A reader that predates names
    /// stops after the first part (postcard ignores trailing bytes).
    pub(crate) fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut bytes = postcard::to_stdvec(self)?;
        if !self.names.is_empty() {
            bytes.extend(postcard::to_stdvec(&self.names)?);
        }
        Ok(bytes)
    }

    /// Reads [`ClusterInfo::encode`]'s bytes, with or without names; returns what follows.
    pub(crate) fn take(bytes: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        let (mut info, rest): (Self, &[u8]) = postcard::take_from_bytes(bytes)?;
        let rest = if rest.is_empty() {
            rest
        } else {
            let (names, rest) = postcard::take_from_bytes(rest)?;
            info.names = names;
            rest
        };
        Ok((info, rest))
    }
}

/// Read-only view of the schemas and entry counts used to validate a batch.
pub trait SchemaView {
    fn schema(&self, name: &str) -> Option<&MapSchema>;
    /// How many maps are declared.
    fn map_count(&self) -> usize;
}

impl SchemaView for BTreeMap<String, MapSchema> {
    fn schema(&self, name: &str) -> Option<&MapSchema> {
        self.get(name)
    }

    fn map_count(&self) -> usize {
        self.len()
    }
}

/// Cuts `items`, in order, into runs that each fit one client batch: at most
/// [`MAX_BATCH_OPS`] items and [`MAX_BATCH_BYTES`] payload bytes (`bytes` gives an item's, as
/// [`Op::payload_bytes`] counts it). Batches raftmap builds by itself are cut this way, so
/// that none is refused for its size.
pub fn batch_runs<T>(
    items: impl IntoIterator<Item = T>,
    bytes: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let (mut run, mut run_bytes) = (Vec::new(), 0usize);
    for item in items {
        let b = bytes(&item);
        if !run.is_empty() && (run.len() == MAX_BATCH_OPS || run_bytes + b > MAX_BATCH_BYTES) {
            runs.push(std::mem::take(&mut run));
            run_bytes = 0;
        }
        run_bytes += b;
        run.push(item);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// A client batch's size against the limits: not empty, at most [`MAX_BATCH_OPS`] operations
/// and [`MAX_BATCH_BYTES`] bytes.
fn check_batch_size(ops: &[Op]) -> Result<(), ValidationError> {
    if ops.is_empty() {
        return Err(ValidationError::EmptyBatch);
    }
    if ops.len() > MAX_BATCH_OPS {
        return Err(ValidationError::BatchTooLarge {
            what: "operations".into(),
            actual: ops.len(),
            limit: MAX_BATCH_OPS,
        });
    }
    let bytes: usize = ops.iter().map(Op::payload_bytes).sum();
    if bytes > MAX_BATCH_BYTES {
        return Err(ValidationError::BatchTooLarge {
            what: "bytes".into(),
            actual: bytes,
            limit: MAX_BATCH_BYTES,
        });
    }
    Ok(())
}

/// Stateless checks of a client batch against the schemas: sizes, names, limits.
///
/// Schemas declared earlier in the same batch count. Entry-count limits and
/// compare-and-swap conditions depend on the data and are checked at apply time.
pub fn validate_batch(ops: &[Op], schemas: &dyn SchemaView) -> Result<(), ValidationError> {
    check_batch_size(ops)?;
    let mut declared: BTreeMap<&str, &MapSchema> = BTreeMap::new();
    let mut new_maps = 0usize;
    for op in ops {
        let lookup = |map: &str| -> Result<MapSchema, ValidationError> {
            declared
                .get(map)
                .map(|s| (*s).clone())
                .or_else(|| schemas.schema(map).cloned())
                .ok_or_else(|| ValidationError::UnknownMap(map.to_string()))
        };
        match op {
            Op::DeclareMap(schema) => {
                schema.validate()?;
                match lookup(&schema.name) {
                    Ok(existing) if &existing != schema => {
                        return Err(ValidationError::SchemaConflict {
                            existing: existing.to_string(),
                            requested: schema.to_string(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) if schemas.map_count() + new_maps >= MAX_MAPS => {
                        return Err(ValidationError::TooManyMaps {
                            map: schema.name.clone(),
                            limit: MAX_MAPS,
                        });
                    }
                    Err(_) => new_maps += 1,
                }
                declared.insert(&schema.name, schema);
            }
            Op::Put { map, key, value } => {
                let schema = lookup(map)?;
                check_key(&schema, key)?;
                check_value(&schema, value)?;
            }
            Op::DropMap { map } => {
                lookup(map)?;
                if ops.len() > 1 {
                    return Err(ValidationError::DropNotAlone(map.clone()));
                }
            }
            Op::Delete { map, key } => {
                let schema = lookup(map)?;
                check_key(&schema, key)?;
                if schema.map_type == MapType::Array {
                    return Err(ValidationError::ArrayDelete(map.clone()));
                }
            }
            Op::CompareAndSwap {
                map,
                key,
                expected,
                new,
            } => {
                let schema = lookup(map)?;
                check_key(&schema, key)?;
                for v in [expected, new].into_iter().flatten() {
                    check_value(&schema, v)?;
                }
                if new.is_none() && schema.map_type == MapType::Array {
                    return Err(ValidationError::ArrayDelete(map.clone()));
                }
            }
        }
    }
    Ok(())
}

fn check_key(schema: &MapSchema, key: &[u8]) -> Result<(), ValidationError> {
    if key.len() != schema.key_size as usize {
        return Err(ValidationError::KeySize {
            map: schema.name.clone(),
            expected: schema.key_size,
            actual: key.len(),
        });
    }
    if schema.map_type == MapType::Array {
        // key_size == 4 is guaranteed by MapSchema::validate and the check above.
        let index = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]);
        if index >= schema.max_entries {
            return Err(ValidationError::ArrayIndex {
                map: schema.name.clone(),
                index,
                max_entries: schema.max_entries,
            });
        }
    }
    Ok(())
}

fn check_value(schema: &MapSchema, value: &[u8]) -> Result<(), ValidationError> {
    if value.len() != schema.value_size as usize {
        return Err(ValidationError::ValueSize {
            map: schema.name.clone(),
            expected: schema.value_size,
            actual: value.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_encode_as_they_did_before_byte_strings() {
        // The layout of entries written before keys and values were byte strings.
        #[derive(Serialize)]
        enum Old {
            _Declare(MapSchema),
            Put {
                map: String,
                key: Vec<u8>,
                value: Vec<u8>,
            },
            _Delete {
                map: String,
                key: Vec<u8>,
            },
            Cas {
                map: String,
                key: Vec<u8>,
                expected: Option<Vec<u8>>,
                new: Option<Vec<u8>>,
            },
        }
        let old = postcard::to_stdvec(&Old::Put {
            map: "m".into(),
            key: vec![1, 2],
            value: vec![3; 300],
        })
        .unwrap();
        let new = Op::Put {
            map: "m".into(),
            key: vec![1, 2],
            value: vec![3; 300],
        };
        assert_eq!(postcard::to_stdvec(&new).unwrap(), old);
        assert_eq!(postcard::from_bytes::<Op>(&old).unwrap(), new);
        let old = postcard::to_stdvec(&Old::Cas {
            map: "m".into(),
            key: vec![1],
            expected: None,
            new: Some(vec![9; 5]),
        })
        .unwrap();
        let new = Op::CompareAndSwap {
            map: "m".into(),
            key: vec![1],
            expected: None,
            new: Some(vec![9; 5]),
        };
        assert_eq!(postcard::to_stdvec(&new).unwrap(), old);
    }

    #[test]
    fn batch_runs_fit_the_limits_of_a_client_batch_in_order() {
        let schemas = BTreeMap::from([("m".to_string(), MapSchema::hash("m", 16, 1024, 1 << 20))]);
        let put = |i: u32| Op::Put {
            map: "m".into(),
            key: [i.to_be_bytes().as_slice(), &[0; 12]].concat(),
            value: vec![1; 1024],
        };
        // 20,000 puts of 1 KiB: 20.8 MB, over two batches' worth of bytes but under two of ops.
        let runs = batch_runs((0..20_000).map(put), Op::payload_bytes);
        assert_eq!(runs.len(), 3);
        for run in &runs {
            validate_batch(run, &schemas).unwrap();
        }
        let flat: Vec<Op> = runs.into_iter().flatten().collect();
        assert_eq!(flat, (0..20_000).map(put).collect::<Vec<_>>());
        // Small operations are cut by count.
        let runs = batch_runs(0..25_000, |_| 1);
        assert_eq!(
            runs.iter().map(Vec::len).collect::<Vec<_>>(),
            [10_000, 10_000, 5_000]
        );
        assert!(batch_runs(Vec::<u8>::new(), |_| 1).is_empty());
    }

    fn schemas() -> BTreeMap<String, MapSchema> {
        let mut m = BTreeMap::new();
        m.insert(
            "ct".into(),
            MapSchema {
                name: "ct".into(),
                map_type: MapType::LruHash,
                key_size: 13,
                value_size: 8,
                max_entries: 1024,
            },
        );
        m
    }

    #[test]
    fn wrong_sizes_name_map_and_both_sizes() {
        let err = validate_batch(
            &[Op::Put {
                map: "ct".into(),
                key: vec![0; 12],
                value: vec![0; 8],
            }],
            &schemas(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "map ct: key is 12 bytes, the schema says 13"
        );
        let err = validate_batch(
            &[Op::Put {
                map: "ct".into(),
                key: vec![0; 13],
                value: vec![0; 9],
            }],
            &schemas(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "map ct: value is 9 bytes, the schema says 8"
        );
    }

    #[test]
    fn unknown_map_and_declared_in_same_batch() {
        let put = Op::Put {
            map: "nat".into(),
            key: vec![1; 4],
            value: vec![2; 4],
        };
        assert_eq!(
            validate_batch(std::slice::from_ref(&put), &schemas()),
            Err(ValidationError::UnknownMap("nat".into()))
        );
        let declare = Op::DeclareMap(MapSchema {
            name: "nat".into(),
            map_type: MapType::Hash,
            key_size: 4,
            value_size: 4,
            max_entries: 8,
        });
        assert_eq!(validate_batch(&[declare, put], &schemas()), Ok(()));
    }

    #[test]
    fn conflicting_redeclaration_is_refused_identical_is_accepted() {
        let mut same = schemas()["ct"].clone();
        assert_eq!(
            validate_batch(&[Op::DeclareMap(same.clone())], &schemas()),
            Ok(())
        );
        same.value_size = 16;
        let err = validate_batch(&[Op::DeclareMap(same)], &schemas()).unwrap_err();
        assert!(
            matches!(err, ValidationError::SchemaConflict { .. }),
            "{err}"
        );
    }

    #[test]
    fn batch_limits() {
        assert_eq!(
            validate_batch(&[], &schemas()),
            Err(ValidationError::EmptyBatch)
        );
        let ops: Vec<Op> = (0..=MAX_BATCH_OPS)
            .map(|_| Op::Delete {
                map: "ct".into(),
                key: vec![0; 13],
            })
            .collect();
        assert!(matches!(
            validate_batch(&ops, &schemas()),
            Err(ValidationError::BatchTooLarge { actual: 10_001, .. })
        ));
    }

    #[test]
    fn array_rules() {
        let arr = MapSchema {
            name: "a".into(),
            map_type: MapType::Array,
            key_size: 4,
            value_size: 4,
            max_entries: 2,
        };
        let mut s = schemas();
        s.insert("a".into(), arr.clone());
        let put = |i: u32| Op::Put {
            map: "a".into(),
            key: i.to_ne_bytes().to_vec(),
            value: vec![0; 4],
        };
        assert_eq!(validate_batch(&[put(1)], &s), Ok(()));
        assert!(matches!(
            validate_batch(&[put(2)], &s),
            Err(ValidationError::ArrayIndex { index: 2, .. })
        ));
        assert!(matches!(
            validate_batch(
                &[Op::Delete {
                    map: "a".into(),
                    key: vec![0; 4]
                }],
                &s
            ),
            Err(ValidationError::ArrayDelete(_))
        ));
        let mut bad = arr;
        bad.key_size = 8;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn map_names() {
        assert!(validate_map_name("conntrack_v4.1-x").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_map_name(bad).is_err(), "{bad:?}");
        }
    }
}
