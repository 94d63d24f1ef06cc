//! The replicated state machine on RocksDB: named maps, their schemas, membership, snapshots.
//!
//! Each `apply` call writes one atomic RocksDB batch holding every change of the applied entries
//! together with the new applied log id, so the stored state is always exactly the state after
//! some log index. Snapshots are a full copy of that state, written to a file and sent whole to
//! a peer that needs one; installing one replaces the state in one atomic batch.

use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};

use crate::db::{data_key, decode, encode, map_prefix, split_data_key, Db, CF_SM_DATA, CF_SM_META};
use crate::digest::{self, Checkpoints, Recomputed, CHECKPOINT_EVERY};
use crate::error::{Result, StorageError, ValidationError};
use crate::model::{
    validate_batch, AdminOp, ApplyResult, BatchOutcome, ClientBatch, ClusterInfo, Entry, LogId,
    MapSchema, MapType, NodeId, Op, Snapshot, SnapshotMeta, Source, StoredMembership, TypeConfig,
    MAX_CAS_REPLY_BYTES,
};
use crate::snapshot::{self, snapshot_name, SnapshotPayload, StoredSnapshot};

const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_CLUSTER: &[u8] = b"cluster";
/// The state's digest (see `digest.rs`), written with `KEY_APPLIED`.
const KEY_DIGEST: &[u8] = b"digest";
const PREFIX_SCHEMA: &str = "schema/";
const PREFIX_COUNT: &str = "count/";
/// How many applied entries are kept in memory for watchers that resume from an index, or that
/// fell behind the live changes...
const RECENT_EVENTS: usize = 4096;
/// ...and how many bytes of changes at most (the oldest entries go first).
const RECENT_BYTES: usize = 64 * 1024 * 1024;

/// One change to one key, as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Declare(MapSchema),
    /// The map and all its entries were removed.
    Drop(String),
    Put {
        map: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        map: String,
        key: Vec<u8>,
    },
}

/// What the state machine tells its observers after each apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmEvent {
    /// The changes one log entry made, in order, with the client batches' origins.
    Applied {
        index: u64,
        changes: Vec<Change>,
        origins: Vec<(NodeId, u64)>,
    },
    /// The whole state was replaced by a snapshot ending at `index`.
    SnapshotInstalled { index: u64 },
}

impl SmEvent {
    pub fn index(&self) -> u64 {
        match self {
            SmEvent::Applied { index, .. } | SmEvent::SnapshotInstalled { index } => *index,
        }
    }

    /// Roughly the memory its changes hold.
    fn bytes(&self) -> usize {
        match self {
            SmEvent::Applied { changes, .. } => changes
                .iter()
                .map(|c| {
                    64 + match c {
                        Change::Declare(s) => s.name.len(),
                        Change::Drop(map) => map.len(),
                        Change::Put { map, key, value } => map.len() + key.len() + value.len(),
                        Change::Delete { map, key } => map.len() + key.len(),
                    }
                })
                .sum(),
            SmEvent::SnapshotInstalled { .. } => 64,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Cache {
    applied: Option<LogId>,
    membership: StoredMembership,
    cluster: ClusterInfo,
    schemas: BTreeMap<String, MapSchema>,
    counts: HashMap<String, u64>,
    /// The digest of the data at `applied`.
    digest: u64,
}

/// Recently applied events, for watchers resuming from an index.
#[derive(Debug, Default)]
struct Recent {
    /// Every event with an index above `floor` is in `events`.
    floor: u64,
    events: VecDeque<Arc<SmEvent>>,
    /// What `events` hold, as [`SmEvent::bytes`] counts it.
    bytes: usize,
    /// Index of the last snapshot installed (0: none since start).
    snapshot: u64,
}

#[derive(Debug)]
struct Shared {
    db: Arc<Db>,
    cache: RwLock<Cache>,
    recent: Mutex<Recent>,
    applied_tx: watch::Sender<u64>,
    checkpoints: Mutex<Checkpoints>,
}

/// Read access to the applied state, shared with the API layer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StateView {
    shared: Arc<Shared>,
}

/// A map's entries: `(key, value)` pairs.
pub type MapEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Every map's full contents, by name: `(key, value)` pairs.
pub type MapContents = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// Receives every committed change as it is applied, in log order, before the state machine
/// persists it: the kernel applier. Called from openraft's apply task, so it must not block for
/// long.
pub trait ApplyHook: Send + Sync + 'static {
    /// The changes of one applied client batch, in the entry at `index`, that `origin` proposed
    /// from `source`.
    fn on_batch(&self, index: u64, origin: NodeId, source: Source, changes: &[Change]);
    /// A snapshot ending at `index` replaces the whole state: the full contents of every map.
    fn on_snapshot(&self, index: u64, maps: &MapContents);
    /// Every batch of the entry at `index` has been passed to `on_batch` (called for every
    /// entry, including those without client batches).
    fn on_entry_applied(&self, _index: u64) {}
}

/// openraft state machine. Construct with [`crate::open`].
pub struct StateMachine {
    shared: Arc<Shared>,
    snapshot_path: PathBuf,
    hook: Option<Arc<dyn ApplyHook>>,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("snapshot_path", &self.snapshot_path)
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

impl StateMachine {
    pub(crate) fn new(
        db: Arc<Db>,
        snapshot_path: PathBuf,
        hook: Option<Arc<dyn ApplyHook>>,
    ) -> Result<(Self, StateView)> {
        let cache = load_cache(&db)?;
        let applied = cache.applied.map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(Shared {
            db,
            cache: RwLock::new(cache),
            recent: Mutex::new(Recent {
                floor: applied,
                ..Recent::default()
            }),
            applied_tx,
            checkpoints: Mutex::new(Checkpoints::default()),
        });
        Ok((
            Self {
                shared: shared.clone(),
                snapshot_path,
                hook,
            },
            StateView { shared },
        ))
    }

    /// Applies committed entries, in order, as one atomic write, and returns each entry's
    /// result. openraft calls this through [`RaftStateMachine::apply`]; tools and tests that
    /// drive a state machine directly call it themselves.
    pub async fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<Vec<ApplyResult>> {
        self.apply_now(entries)
    }

    fn apply_now(&self, entries: Vec<Entry>) -> Result<Vec<ApplyResult>> {
        let shared = &self.shared;
        let db = &shared.db;
        let mut work = read_cache(shared).clone();
        let mut pending: Pending<'_> = HashMap::new();
        let mut touched_schemas: Vec<String> = Vec::new();
        let mut membership_changed = false;
        let mut cluster_changed = false;
        let mut results = Vec::with_capacity(entries.len());
        let mut events = Vec::with_capacity(entries.len());
        let mut checkpoints = Vec::new();
        let mut dropped: Vec<String> = Vec::new();

        for entry in &entries {
            let index = entry.log_id.index;
            work.applied = Some(entry.log_id);
            match &entry.payload {
                EntryPayload::Blank => results.push(ApplyResult::default()),
                EntryPayload::Membership(m) => {
                    work.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    membership_changed = true;
                    results.push(ApplyResult::default());
                }
                EntryPayload::Normal(proposal) => {
                    for admin in &proposal.admin {
                        cluster_changed = true;
                        match admin {
                            AdminOp::InitCluster { cluster_id } => {
                                if work.cluster.cluster_id.is_none() {
                                    work.cluster.cluster_id = Some(cluster_id.clone());
                                }
                            }
                            AdminOp::RetireNode { node_id } => {
                                if !work.cluster.retired.contains(node_id) {
                                    work.cluster.retired.push(*node_id);
                                }
                                work.cluster.names.remove(node_id);
                            }
                            AdminOp::NameNode { node_id, name } => {
                                if !work.cluster.retired.contains(node_id) {
                                    work.cluster.names.insert(*node_id, name.clone());
                                }
                            }
                        }
                    }
                    let mut outcomes = Vec::with_capacity(proposal.batches.len());
                    let mut changes = Vec::new();
                    let mut origins = Vec::with_capacity(proposal.batches.len());
                    for batch in &proposal.batches {
                        let start = changes.len();
                        let outcome =
                            stage_batch(db, &mut work, &mut pending, batch, &mut changes)?;
                        if outcome == BatchOutcome::Applied {
                            origins.push((batch.origin, batch.seq));
                            if let Some(hook) = &self.hook {
                                hook.on_batch(
                                    entry.log_id.index,
                                    batch.origin,
                                    batch.source,
                                    &changes[start..],
                                );
                            }
                        }
                        outcomes.push(outcome);
                    }
                    touched_schemas.extend(changes.iter().filter_map(|c| match c {
                        Change::Declare(s) => Some(s.name.clone()),
                        Change::Drop(map) => Some(map.clone()),
                        _ => None,
                    }));
                    dropped.extend(changes.iter().filter_map(|c| match c {
                        Change::Drop(map) => Some(map.clone()),
                        _ => None,
                    }));
                    events.push(SmEvent::Applied {
                        index: entry.log_id.index,
                        changes,
                        origins,
                    });
                    results.push(ApplyResult { outcomes });
                }
            }
            if let Some(hook) = &self.hook {
                hook.on_entry_applied(index);
            }
            if index % CHECKPOINT_EVERY == 0 {
                checkpoints.push((index, work.digest));
            }
        }

        // One atomic write: data, counts, schemas, membership and the applied log id together.
        let data_cf = db.cf(CF_SM_DATA)?;
        let meta_cf = db.cf(CF_SM_META)?;
        let mut batch = rocksdb::WriteBatch::default();
        // In key order: the memtable's skip list inserts a run of ascending keys from where
        // the previous one went instead of searching from the top each time.
        let mut pending: Vec<_> = pending.into_iter().collect();
        pending.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Dropped maps first: what is staged for a map declared again after its drop follows.
        for map in &dropped {
            let (from, to) = map_range(map);
            batch.delete_range_cf(data_cf, from, to);
            if !work.counts.contains_key(map) {
                batch.delete_cf(meta_cf, format!("{PREFIX_COUNT}{map}"));
            }
        }
        for (k, v) in &pending {
            match v {
                Some(v) => batch.put_cf(data_cf, k, v),
                None => batch.delete_cf(data_cf, k),
            }
        }
        {
            // Only the counts this call changed (or created) are written.
            let before = &read_cache(shared).counts;
            for (map, count) in &work.counts {
                if before.get(map) != Some(count) {
                    batch.put_cf(meta_cf, format!("{PREFIX_COUNT}{map}"), count.to_be_bytes());
                }
            }
        }
        for name in &touched_schemas {
            match work.schemas.get(name) {
                Some(s) => batch.put_cf(
                    meta_cf,
                    format!("{PREFIX_SCHEMA}{name}"),
                    encode(s, "schema")?,
                ),
                None => batch.delete_cf(meta_cf, format!("{PREFIX_SCHEMA}{name}")),
            }
        }
        if membership_changed {
            batch.put_cf(
                meta_cf,
                KEY_MEMBERSHIP,
                encode(&work.membership, "membership")?,
            );
        }
        if cluster_changed {
            batch.put_cf(meta_cf, KEY_CLUSTER, encode_cluster(&work.cluster)?);
        }
        batch.put_cf(meta_cf, KEY_APPLIED, encode(&work.applied, "applied")?);
        batch.put_cf(meta_cf, KEY_DIGEST, work.digest.to_be_bytes());
        // Not synced on its own: the log is durable, and this database shares its write-ahead
        // log with the log store, so the next synced log write also makes this one durable.
        db.write(batch, false)?;

        let applied = work.applied.map_or(0, |l| l.index);
        *write_cache(shared) = work;
        {
            let mut cps = shared.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
            for (index, d) in checkpoints {
                cps.push(index, d);
            }
        }
        for ev in events {
            shared.publish(ev);
        }
        shared.applied_tx.send_replace(applied);
        Ok(results)
    }

    fn install(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<()> {
        let payload = snapshot::decode_data(&data, &format!("snapshot {}", snapshot_name(meta)))?;
        let db = &self.shared.db;
        let data_cf = db.cf(CF_SM_DATA)?;
        let meta_cf = db.cf(CF_SM_META)?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(data_cf, [0u8].as_slice(), [0xffu8; 2].as_slice());
        batch.delete_range_cf(meta_cf, [0u8].as_slice(), [0xffu8; 2].as_slice());
        let mut cache = Cache {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            cluster: payload.cluster,
            digest: digest::of_entries(
                payload
                    .entries
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice())),
            ),
            ..Cache::default()
        };
        for s in payload.schemas {
            batch.put_cf(
                meta_cf,
                format!("{PREFIX_SCHEMA}{}", s.name),
                encode(&s, "schema")?,
            );
            cache.counts.insert(s.name.clone(), 0);
            cache.schemas.insert(s.name.clone(), s);
        }
        let mut by_map = MapContents::new();
        for (k, v) in &payload.entries {
            if let Some((map, key)) = split_data_key(k) {
                *cache.counts.entry(map.to_string()).or_default() += 1;
                if self.hook.is_some() {
                    by_map
                        .entry(map.to_string())
                        .or_default()
                        .push((key.to_vec(), v.clone()));
                }
            }
            batch.put_cf(data_cf, k, v);
        }
        if let Some(hook) = &self.hook {
            for name in cache.schemas.keys() {
                by_map.entry(name.clone()).or_default();
            }
            hook.on_snapshot(meta.last_log_id.map_or(0, |l| l.index), &by_map);
        }
        for (map, count) in &cache.counts {
            batch.put_cf(meta_cf, format!("{PREFIX_COUNT}{map}"), count.to_be_bytes());
        }
        batch.put_cf(meta_cf, KEY_APPLIED, encode(&cache.applied, "applied")?);
        batch.put_cf(meta_cf, KEY_DIGEST, cache.digest.to_be_bytes());
        batch.put_cf(
            meta_cf,
            KEY_MEMBERSHIP,
            encode(&cache.membership, "membership")?,
        );
        batch.put_cf(meta_cf, KEY_CLUSTER, encode_cluster(&cache.cluster)?);
        db.write(batch, true)?;
        snapshot::write_file(
            &self.snapshot_path,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        let index = cache.applied.map_or(0, |l| l.index);
        {
            let mut cps = self
                .shared
                .checkpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            cps.clear();
            if index % CHECKPOINT_EVERY == 0 {
                cps.push(index, cache.digest);
            }
        }
        *write_cache(&self.shared) = cache;
        self.shared.publish(SmEvent::SnapshotInstalled { index });
        self.shared.applied_tx.send_replace(index);
        tracing::info!(snapshot = %snapshot_name(meta), index, "installed snapshot");
        Ok(())
    }
}

/// The data keys of `map`: `[from, to)`.
fn map_range(map: &str) -> (Vec<u8>, Vec<u8>) {
    let from = map_prefix(map);
    // The prefix is a length byte and the name, so every key of the map, and only those, start
    // with it; the range ends at the next prefix.
    let mut to = from.clone();
    while let Some(last) = to.pop() {
        if last < u8::MAX {
            to.push(last + 1);
            break;
        }
    }
    (from, to)
}

/// Removes a map from the working state: its schema, its count, its entries' share of the
/// digest, and whatever this apply call staged for it (the write deletes its stored entries).
fn stage_drop(db: &Db, work: &mut Cache, pending: &mut Pending<'_>, map: &str) -> Result<()> {
    let (from, to) = map_range(map);
    let data_cf = db.cf(CF_SM_DATA)?;
    let mut removed = 0u64;
    let it = db.db.iterator_cf(
        data_cf,
        rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
    );
    for item in it {
        let (k, v) = item?;
        if k.as_ref() >= to.as_slice() {
            break;
        }
        // A value staged by this apply call replaces the stored one (`None`: deleted).
        let h = match pending.get(k.as_ref()) {
            Some(Some(staged)) => Some(digest::entry_hash(&k, staged)),
            Some(None) => None,
            None => Some(digest::entry_hash(&k, &v)),
        };
        removed = removed.wrapping_add(h.unwrap_or(0));
    }
    // Staged entries not stored yet.
    let staged_only: Vec<Vec<u8>> = pending
        .keys()
        .filter(|k| k.as_slice() >= from.as_slice() && k.as_slice() < to.as_slice())
        .cloned()
        .collect();
    for k in staged_only {
        if let Some(Some(v)) = pending.remove(&k) {
            if db.db.get_pinned_cf(data_cf, &k)?.is_none() {
                removed = removed.wrapping_add(digest::entry_hash(&k, v));
            }
        }
    }
    work.digest = work.digest.wrapping_sub(removed);
    work.schemas.remove(map);
    work.counts.remove(map);
    Ok(())
}

/// Staged writes of one `apply` call, by data key: values borrowed from the entries applied.
type Pending<'a> = HashMap<Vec<u8>, Option<&'a [u8]>>;

/// Applies one client batch to the working state, all or nothing.
fn stage_batch<'a>(
    db: &Db,
    work: &mut Cache,
    pending: &mut Pending<'a>,
    batch: &'a ClientBatch,
    changes: &mut Vec<Change>,
) -> Result<BatchOutcome> {
    if let Err(e) = validate_batch(&batch.ops, &work.schemas) {
        return Ok(BatchOutcome::Rejected(e));
    }
    if let [Op::DropMap { map }] = batch.ops.as_slice() {
        stage_drop(db, work, pending, map)?;
        changes.push(Change::Drop(map.clone()));
        return Ok(BatchOutcome::Applied);
    }
    // Effects of this batch alone, layered over `pending` and the database: in order, and the
    // latest value per key (a batch holds up to MAX_BATCH_OPS operations; looking keys up in
    // the ordered list alone would make a batch quadratic in its size).
    let mut local: Vec<(Vec<u8>, Option<&'a [u8]>)> = Vec::new();
    let mut latest: Pending<'a> = HashMap::new();
    let mut declared: Vec<MapSchema> = Vec::new();
    let mut count_delta: HashMap<&str, i64> = HashMap::new();
    let mut mismatches = Vec::new();
    let (mut listed_bytes, mut omitted) = (0usize, 0u32);
    let data_cf = db.cf(CF_SM_DATA)?;
    let read = rocksdb::ReadOptions::default();
    // What this apply call has staged for `k` (`Some(None)`: deleted), if anything.
    let staged = |k: &[u8], latest: &Pending<'a>| latest.get(k).or_else(|| pending.get(k)).copied();
    // The value `k` has before this op, and whether it has one.
    let current = |k: &[u8], latest: &Pending<'a>| -> Result<Option<Vec<u8>>> {
        match staged(k, latest) {
            Some(v) => Ok(v.map(<[u8]>::to_vec)),
            None => Ok(db
                .db
                .get_pinned_cf_opt(data_cf, k, &read)?
                .map(|v| v.to_vec())),
        }
    };
    // The digest hash of `k`'s entry before this op (`None`: absent).
    let old_hash = |k: &[u8], latest: &Pending<'a>| -> Result<Option<u64>> {
        match staged(k, latest) {
            Some(v) => Ok(v.map(|v| digest::entry_hash(k, v))),
            None => Ok(db
                .db
                .get_pinned_cf_opt(data_cf, k, &read)?
                .map(|v| digest::entry_hash(k, &v))),
        }
    };
    let mut digest_delta = 0u64;
    for (i, op) in batch.ops.iter().enumerate() {
        let (map, key, new) = match op {
            Op::DeclareMap(s) => {
                if !work.schemas.contains_key(&s.name) && !declared.iter().any(|d| d.name == s.name)
                {
                    declared.push(s.clone());
                }
                continue;
            }
            // Alone in its batch (validated), staged above.
            Op::DropMap { .. } => continue,
            Op::Put { map, key, value } => (map, key, Some(value.as_slice())),
            Op::Delete { map, key } => (map, key, None),
            Op::CompareAndSwap {
                map,
                key,
                expected,
                new,
            } => {
                let k = data_key(map, key);
                let actual = current(&k, &latest)?;
                if &actual != expected {
                    // The answer lists mismatches within a byte budget: 10k failed CAS
                    // against 64 KiB values must not make every node hold 625 MiB.
                    let size = actual.as_ref().map_or(0, Vec::len);
                    if mismatches.is_empty() || listed_bytes + size <= MAX_CAS_REPLY_BYTES {
                        listed_bytes += size;
                        // Index fits: batches hold at most MAX_BATCH_OPS operations.
                        mismatches.push((i as u32, actual));
                    } else {
                        omitted += 1;
                    }
                    continue;
                }
                (map, key, new.as_deref())
            }
        };
        let k = data_key(map, key);
        let old = old_hash(&k, &latest)?;
        if let Some(h) = old {
            digest_delta = digest_delta.wrapping_sub(h);
        }
        if let Some(v) = new {
            digest_delta = digest_delta.wrapping_add(digest::entry_hash(&k, v));
        }
        let delta = i64::from(new.is_some()) - i64::from(old.is_some());
        *count_delta.entry(map.as_str()).or_default() += delta;
        latest.insert(k.clone(), new);
        local.push((k, new));
    }
    if !mismatches.is_empty() {
        return Ok(BatchOutcome::CasFailed {
            mismatches,
            omitted,
        });
    }
    let schema_of = |name: &str| {
        work.schemas
            .get(name)
            .or_else(|| declared.iter().find(|d| d.name == name))
    };
    for (map, delta) in &count_delta {
        let Some(schema) = schema_of(map) else {
            continue;
        };
        let count = work.counts.get(*map).copied().unwrap_or(0) as i64 + delta;
        if schema.map_type != MapType::Array && count > i64::from(schema.max_entries) {
            return Ok(BatchOutcome::Rejected(ValidationError::MapFull {
                map: schema.name.clone(),
                max_entries: schema.max_entries,
            }));
        }
    }
    // Commit the batch into the working state.
    work.digest = work.digest.wrapping_add(digest_delta);
    for s in declared {
        work.counts.insert(s.name.clone(), 0);
        changes.push(Change::Declare(s.clone()));
        work.schemas.insert(s.name.clone(), s);
    }
    for (map, delta) in count_delta {
        let c = work.counts.entry(map.to_string()).or_default();
        *c = (*c as i64 + delta).max(0) as u64;
    }
    for (k, v) in local {
        if let Some((map, key)) = split_data_key(&k) {
            changes.push(match v {
                Some(value) => Change::Put {
                    map: map.to_string(),
                    key: key.to_vec(),
                    value: value.to_vec(),
                },
                None => Change::Delete {
                    map: map.to_string(),
                    key: key.to_vec(),
                },
            });
        }
        pending.insert(k, v);
    }
    Ok(BatchOutcome::Applied)
}

fn read_cache(shared: &Shared) -> std::sync::RwLockReadGuard<'_, Cache> {
    // A poisoned lock means a panic while holding it; the cache is replaced wholesale under the
    // lock, so its content is still consistent.
    shared.cache.read().unwrap_or_else(|p| p.into_inner())
}

fn write_cache(shared: &Shared) -> std::sync::RwLockWriteGuard<'_, Cache> {
    shared.cache.write().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Keeps an applied entry's event for watchers (they learn of it from the applied index,
    /// which is published after this).
    fn publish(&self, ev: SmEvent) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let SmEvent::SnapshotInstalled { index } = ev {
            recent.events.clear();
            recent.bytes = 0;
            recent.floor = index;
            recent.snapshot = index;
            return;
        }
        recent.bytes += ev.bytes();
        recent.events.push_back(Arc::new(ev));
        while recent.events.len() > RECENT_EVENTS
            || (recent.bytes > RECENT_BYTES && recent.events.len() > 1)
        {
            if let Some(old) = recent.events.pop_front() {
                recent.floor = old.index();
                recent.bytes -= old.bytes();
            }
        }
    }
}

fn encode_cluster(c: &ClusterInfo) -> Result<Vec<u8>> {
    c.encode().map_err(|source| StorageError::Encode {
        what: "cluster",
        source,
    })
}

fn load_cache(db: &Db) -> Result<Cache> {
    let mut cache = Cache {
        applied: db.get::<Option<LogId>>(CF_SM_META, KEY_APPLIED)?.flatten(),
        membership: db.get(CF_SM_META, KEY_MEMBERSHIP)?.unwrap_or_default(),
        cluster: match db.db.get_pinned_cf(db.cf(CF_SM_META)?, KEY_CLUSTER)? {
            Some(bytes) => {
                ClusterInfo::take(&bytes)
                    .map_err(|source| StorageError::Decode {
                        what: "sm_meta/cluster".into(),
                        source,
                    })?
                    .0
            }
            None => ClusterInfo::default(),
        },
        ..Cache::default()
    };
    let cf = db.cf(CF_SM_META)?;
    for item in db.db.prefix_iterator_cf(cf, PREFIX_SCHEMA) {
        let (k, v) = item?;
        if !k.starts_with(PREFIX_SCHEMA.as_bytes()) {
            break;
        }
        let s: MapSchema = decode(&v, || String::from_utf8_lossy(&k).into_owned())?;
        cache.schemas.insert(s.name.clone(), s);
    }
    for item in db.db.prefix_iterator_cf(cf, PREFIX_COUNT) {
        let (k, v) = item?;
        if !k.starts_with(PREFIX_COUNT.as_bytes()) {
            break;
        }
        let name = String::from_utf8_lossy(&k[PREFIX_COUNT.len()..]).into_owned();
        let n = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
        cache.counts.insert(name, n);
    }
    cache.digest = match db.db.get_pinned_cf(cf, KEY_DIGEST)? {
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
        // Written by a version without digests: computed once from the data.
        None => digest::recompute(db, |_| Ok((0, 0)))?.actual,
    };
    Ok(cache)
}

/// Builds a snapshot from a copy of the state taken between two applies.
#[derive(Debug)]
pub struct SnapshotBuilder {
    meta: SnapshotMeta,
    payload: Option<SnapshotPayload>,
    snapshot_path: PathBuf,
    error: Option<String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        if let Some(e) = &self.error {
            return Err(std::io::Error::other(e.clone()));
        }
        let payload = self
            .payload
            .take()
            .ok_or_else(|| std::io::Error::other("snapshot builder used twice"))?;
        let data = snapshot::encode_data(&payload).map_err(io_err)?;
        let stored = StoredSnapshot {
            meta: self.meta.clone(),
            data,
        };
        snapshot::write_file(&self.snapshot_path, &stored).map_err(io_err)?;
        tracing::info!(snapshot = %snapshot_name(&stored.meta), entries = payload.entries.len(), "built snapshot");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        let c = read_cache(&self.shared);
        Ok((c.applied, c.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> std::io::Result<()>
    where
        S: Stream<Item = std::io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        // Everything openraft hands over in one call is applied as one atomic write.
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        let results = self.apply_now(batch).map_err(io_err)?;
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(r) = responder {
                r.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Copy the state now, between two applies, so the snapshot is exactly the state at
        // `applied`; serialising and writing it happens later, off the apply path.
        let cache = read_cache(&self.shared).clone();
        let meta = SnapshotMeta {
            last_log_id: cache.applied,
            last_membership: cache.membership.clone(),
        };
        let entries = self.shared.scan_all();
        let (payload, error) = match entries {
            Ok(entries) => (
                Some(SnapshotPayload {
                    cluster: cache.cluster.clone(),
                    schemas: cache.schemas.values().cloned().collect(),
                    entries,
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        SnapshotBuilder {
            meta,
            payload,
            snapshot_path: self.snapshot_path.clone(),
            error,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Cursor<Vec<u8>>,
    ) -> std::io::Result<()> {
        self.install(meta, snapshot.into_inner()).map_err(io_err)
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        let stored = match snapshot::read_file(&self.snapshot_path) {
            Ok(s) => s,
            Err(e @ (StorageError::BadSnapshot { .. } | StorageError::Decode { .. })) => {
                // Never used nor sent: a snapshot of the state as it is now replaces it (this
                // runs between two applies, so the state is exactly the applied index).
                tracing::error!(error = %e, path = %self.snapshot_path.display(), "the current snapshot is corrupt; building a new one from the state machine");
                let mut builder = self.get_snapshot_builder().await;
                return builder.build_snapshot().await.map(Some);
            }
            Err(e) => return Err(io_err(e)),
        };
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Cursor::new(s.data),
        }))
    }
}

impl Shared {
    fn scan_all(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let cf = self.db.cf(CF_SM_DATA)?;
        let mut out = Vec::new();
        for item in self.db.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

impl StateView {
    /// Index of the last applied log entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    /// Waits until the applied index reaches `index`, or `timeout` passes. Returns whether it did.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.applied_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The value of `key` in `map` as of the applied index.
    pub fn get(&self, map: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = &self.shared.db;
        Ok(db.db.get_cf(db.cf(CF_SM_DATA)?, data_key(map, key))?)
    }

    /// Up to `limit` entries of `map` with keys strictly after `after`, in key order.
    pub fn scan(
        &self,
        map: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.scan_page(map, after, limit, usize::MAX)?.0)
    }

    /// One page of a map's entries after `after`, in key order: at most `limit` entries and,
    /// beyond the first, `max_bytes` of keys and values. The flag says whether more follow.
    pub fn scan_page(
        &self,
        map: &str,
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(MapEntries, bool)> {
        let db = &self.shared.db;
        let prefix = map_prefix(map);
        let start = after.map_or_else(|| prefix.clone(), |a| data_key(map, a));
        let it = db.db.iterator_cf(
            db.cf(CF_SM_DATA)?,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                return Ok((out, false));
            }
            let key = &k[prefix.len()..];
            if after.is_some_and(|a| a == key) {
                continue;
            }
            bytes += key.len() + v.len();
            if out.len() >= limit || (bytes > max_bytes && !out.is_empty()) {
                return Ok((out, true));
            }
            out.push((key.to_vec(), v.to_vec()));
        }
        Ok((out, false))
    }

    pub fn schema(&self, map: &str) -> Option<MapSchema> {
        read_cache(&self.shared).schemas.get(map).cloned()
    }

    /// Every declared schema by name.
    pub fn schema_map(&self) -> BTreeMap<String, MapSchema> {
        read_cache(&self.shared).schemas.clone()
    }

    pub fn schemas(&self) -> Vec<MapSchema> {
        read_cache(&self.shared).schemas.values().cloned().collect()
    }

    /// Number of entries in `map`.
    pub fn entry_count(&self, map: &str) -> u64 {
        read_cache(&self.shared)
            .counts
            .get(map)
            .copied()
            .unwrap_or(0)
    }

    pub fn cluster(&self) -> ClusterInfo {
        read_cache(&self.shared).cluster.clone()
    }

    pub fn membership(&self) -> StoredMembership {
        read_cache(&self.shared).membership.clone()
    }

    /// Waits until the applied index passes `index`; false once the state machine is gone.
    pub async fn wait_past(&self, index: u64) -> bool {
        let mut rx = self.shared.applied_tx.subscribe();
        let passed = rx.wait_for(|a| *a > index).await.is_ok();
        passed
    }

    /// The state's digest at the last checkpoints (`(index, digest)`, oldest first): every
    /// `CHECKPOINT_EVERY` entries. Replicas at the same index must agree.
    pub fn checkpoints(&self) -> Vec<(u64, u64)> {
        self.shared
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_vec()
    }

    /// Reads the whole state back from disk (from a consistent snapshot of the database) and
    /// compares its digest with the one the state machine kept: a mismatch is a corrupt disk.
    /// Takes a while on a large state; run it off the async runtime.
    pub fn verify_disk(&self) -> Result<Recomputed> {
        let db = &self.shared.db;
        digest::recompute(db, |snap| {
            let meta = db.cf(CF_SM_META)?;
            let applied: Option<LogId> = match snap.get_cf(meta, KEY_APPLIED)? {
                Some(v) => decode(&v, || "applied".into())?,
                None => None,
            };
            let stored = snap.get_cf(meta, KEY_DIGEST)?.map_or(0, |v| {
                u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8]))
            });
            Ok((applied.map_or(0, |l| l.index), stored))
        })
    }

    /// Index of the last snapshot this node installed since it started (0: none).
    pub fn last_snapshot_installed(&self) -> u64 {
        self.shared
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot
    }

    /// Events with index greater than `after` still held in memory, or `None` when some of them
    /// are no longer held (the caller must then start from a full read). At most
    /// `RECENT_EVENTS` entries and `RECENT_BYTES` of changes are held.
    pub fn events_since(&self, after: u64) -> Option<Vec<Arc<SmEvent>>> {
        let recent = self.shared.recent.lock().unwrap_or_else(|p| p.into_inner());
        if after < recent.floor {
            return None;
        }
        Some(
            recent
                .events
                .iter()
                .filter(|e| e.index() > after)
                .cloned()
                .collect(),
        )
    }
}
