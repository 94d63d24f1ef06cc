//! openraft log storage on RocksDB: entries, vote, committed log id, purge.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::db::{decode, encode, Db, CF_LOG, CF_META};
use crate::model::{Entry, LogId, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// Most encoded log bytes in one AppendEntries (one entry larger than this still goes alone;
/// a proposal holds at most a client batch of `MAX_BATCH_BYTES`, plus framing).
const APPEND_BYTES: usize = 16 * 1024 * 1024;

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log. Cheap to clone: clones share the database.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Db>,
    /// Last committed index this node has persisted (`u64::MAX` when none), for status.
    committed: Arc<AtomicU64>,
    /// Where appends wait to be made durable; `None` when fsync is off.
    syncer: Option<WalSyncer>,
}

/// Makes appends durable off openraft's path. An append is written to RocksDB at once
/// (readable, so the leader can replicate it while its own disk syncs) and its callback
/// waits here for the next sync of the write-ahead log. One sync covers every append written
/// before it started, so appends that arrive while a sync runs share the next one.
#[derive(Debug, Clone)]
struct WalSyncer {
    tx: std::sync::mpsc::Sender<IOFlushed<TypeConfig>>,
}

impl WalSyncer {
    fn start(db: &Arc<Db>) -> crate::error::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<IOFlushed<TypeConfig>>();
        // Weak: the thread must not keep the database open once the store is dropped (a
        // reopen in the same process would find RocksDB's lock held). It ends when every
        // clone of the store, and with them the sender, is gone.
        let db = Arc::downgrade(db);
        std::thread::Builder::new()
            .name("raftmap-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let waiting: Vec<_> = std::iter::once(first).chain(rx.try_iter()).collect();
                    let res = match db.upgrade() {
                        Some(db) => db.db.flush_wal(true).map_err(|e| e.to_string()),
                        None => Err("the log store was closed".to_string()),
                    };
                    if let Err(e) = &res {
                        tracing::error!(error = %e, "syncing the raft log failed");
                    }
                    for callback in waiting {
                        callback.io_completed(res.clone().map_err(io::Error::other));
                    }
                }
            })
            .map_err(|source| crate::error::StorageError::Io {
                path: "raft log sync thread".into(),
                source,
            })?;
        Ok(Self { tx })
    }
}

impl LogStore {
    pub(crate) fn new(db: Arc<Db>) -> crate::error::Result<Self> {
        let committed: Option<Option<LogId>> = db.get(CF_META, KEY_COMMITTED)?;
        let index = committed.flatten().map_or(u64::MAX, |l| l.index);
        let syncer = if db.opts.sync {
            Some(WalSyncer::start(&db)?)
        } else {
            None
        };
        Ok(Self {
            db,
            committed: Arc::new(AtomicU64::new(index)),
            syncer,
        })
    }

    /// Highest committed index this node knows of, if any.
    pub fn committed_index(&self) -> Option<u64> {
        match self.committed.load(Ordering::Relaxed) {
            u64::MAX => None,
            i => Some(i),
        }
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        what: &'static str,
    ) -> crate::error::Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(self.db.cf(CF_META)?, key, encode(value, what)?);
        self.db.write(batch, true)
    }

    fn last_log_id(&self) -> crate::error::Result<Option<LogId>> {
        let mut it = self
            .db
            .db
            .iterator_cf(self.db.cf(CF_LOG)?, rocksdb::IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item?;
                let entry: Entry = decode(&v, || "last log entry".into())?;
                Ok(Some(entry.log_id))
            }
        }
    }

    /// Entries from `start` up to `end` (exclusive; `None`: the last), stopping before the entry
    /// that would take the encoded bytes read past `budget` (the first entry is always read).
    fn read_range(
        &self,
        start: u64,
        end: Option<u64>,
        budget: Option<usize>,
    ) -> crate::error::Result<Vec<Entry>> {
        let cf = self.db.cf(CF_LOG)?;
        let from = index_key(start);
        let it = self.db.db.iterator_cf(
            cf,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in it {
            let (k, v) = item?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0xff; 8]));
            if end.is_some_and(|e| idx >= e) {
                break;
            }
            bytes += v.len();
            if budget.is_some_and(|b| bytes > b) && !out.is_empty() {
                break;
            }
            out.push(decode(&v, || format!("log entry {idx}"))?);
        }
        Ok(out)
    }
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e + 1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        self.read_range(start, end, None).map_err(io_err)
    }

    /// What the leader sends a follower in one AppendEntries: bounded by bytes as well as by
    /// openraft's entry count, so that entries of megabytes never make a message larger than a
    /// peer accepts.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.read_range(start, Some(end), Some(APPEND_BYTES))
            .map_err(io_err)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.db.get(CF_META, KEY_VOTE).map_err(io_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let purged: Option<LogId> = self.db.get(CF_META, KEY_PURGED).map_err(io_err)?;
        let last = self.last_log_id().map_err(io_err)?.or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.put_meta(KEY_VOTE, vote, "vote").map_err(io_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Not synced: losing the committed index on a crash only delays re-applying entries,
        // which openraft recovers from the log.
        let index = committed.as_ref().map_or(u64::MAX, |l| l.index);
        let bytes = encode(&committed, "committed").map_err(io_err)?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(self.db.cf(CF_META).map_err(io_err)?, KEY_COMMITTED, bytes);
        self.db.write(batch, false).map_err(io_err)?;
        self.committed.store(index, Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let c: Option<Option<LogId>> = self.db.get(CF_META, KEY_COMMITTED).map_err(io_err)?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf(CF_LOG).map_err(io_err)?;
        let mut batch = rocksdb::WriteBatch::default();
        for entry in entries {
            let bytes = encode(&entry, "log entry").map_err(io_err)?;
            batch.put_cf(cf, index_key(entry.log_id.index), bytes);
        }
        // Written now, durable later: the syncer calls back once the write-ahead log holding
        // this write is on disk.
        if let Err(e) = self.db.write(batch, false) {
            callback.io_completed(Err(io::Error::other(e.to_string())));
            return Err(io_err(e));
        }
        match &self.syncer {
            Some(syncer) => {
                if let Err(std::sync::mpsc::SendError(callback)) = syncer.tx.send(callback) {
                    callback.io_completed(Err(io::Error::other("raft log sync thread is gone")));
                }
            }
            None => callback.io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let cf = self.db.cf(CF_LOG).map_err(io_err)?;
        let first_removed = last_log_id.map_or(0, |l| l.index + 1);
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(cf, index_key(first_removed), index_key(u64::MAX));
        // The entry at u64::MAX is never written (openraft indexes stay far below it).
        self.db.write(batch, true).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let cf = self.db.cf(CF_LOG).map_err(io_err)?;
        let meta = self.db.cf(CF_META).map_err(io_err)?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(meta, KEY_PURGED, encode(&log_id, "purged").map_err(io_err)?);
        batch.delete_range_cf(cf, index_key(0), index_key(log_id.index + 1));
        self.db.write(batch, true).map_err(io_err)
    }
}
