//! The RocksDB instance shared by the log and the state machine, and its record encoding.
//!
//! One database, four column families. Sharing one write-ahead log matters for durability: a
//! synced write makes every earlier write durable too, so a state-machine write (unsynced) can
//! never be lost while a later log purge (synced) survives.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, StorageError};

/// Raft log entries, keyed by big-endian index.
pub(crate) const CF_LOG: &str = "log";
/// Vote, committed log id, last purged log id.
pub(crate) const CF_META: &str = "meta";
/// State machine metadata: applied log id, membership, cluster info, schemas, counts.
pub(crate) const CF_SM_META: &str = "sm_meta";
/// State machine data: `[name length][name][key]` -> value.
pub(crate) const CF_SM_DATA: &str = "sm_data";

const ALL_CFS: [&str; 4] = [CF_LOG, CF_META, CF_SM_META, CF_SM_DATA];

/// How writes reach the disk.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// fsync the write-ahead log before acknowledging log appends, votes and purges.
    /// On by default; turning it off trades durability across power loss for latency.
    pub sync: bool,
    /// Free bytes the data dir's filesystem must keep: a write that finds less refuses with
    /// [`StorageError::DiskFull`] before it reaches RocksDB, so the node stops on a clean error
    /// instead of meeting `ENOSPC` inside RocksDB (whose failed writers cannot be written again).
    pub min_free_bytes: u64,
}

/// Default of [`StoreOptions::min_free_bytes`].
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sync: true,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) db: DB,
    pub(crate) opts: StoreOptions,
    dir: PathBuf,
    /// Bytes written since free space was last checked (at first more than any reserve, so that
    /// the first write looks).
    unchecked: AtomicU64,
    /// When free space was last checked, in milliseconds since `opened`.
    checked_ms: AtomicU64,
    opened: Instant,
}

/// Free space is looked up again once this share of the reserve has been written since the
/// last look, or this long after it (other processes fill disks too): the reserve covers what
/// is written in between, and the write path makes a statvfs call rarely instead of per write.
const RECHECK_SHARE: u64 = 8;
const RECHECK_AFTER: Duration = Duration::from_millis(100);

impl Db {
    pub(crate) fn open(dir: &Path, opts: StoreOptions) -> Result<Arc<Self>> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        // A corrupt record in the write-ahead log refuses the start instead of ending the
        // replay there (RocksDB's default drops every record after it, fsynced ones included:
        // acknowledged writes and votes). Only a record cut short at the very end, which was
        // never synced and so never acknowledged, is tolerated.
        db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        // Warnings and errors only in RocksDB's info log (`LOG`): a corrupt WAL record is a
        // warning, which `corrupt_wal` reads back. Fewer writes to `LOG` also matter on a full
        // disk: the info log writer aborts the process (an assertion in Debian's build) when
        // written again after one of its writes failed.
        db_opts.set_log_level(rocksdb::LogLevel::Warn);
        // A tiny memtable flush threshold is not needed; defaults suit a log-structured workload.
        let cfs = ALL_CFS.iter().map(|name| {
            let opts = if *name == CF_SM_DATA {
                data_cf_options()
            } else {
                Options::default()
            };
            ColumnFamilyDescriptor::new(*name, opts)
        });
        let db =
            DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(|source| {
                match corrupt_wal(dir) {
                    Some((wal, detail)) if source.kind() == rocksdb::ErrorKind::Corruption => {
                        StorageError::CorruptWal { wal, detail }
                    }
                    _ => StorageError::Open {
                        path: dir.display().to_string(),
                        source,
                    },
                }
            })?;
        Ok(Arc::new(Self {
            db,
            opts,
            dir: dir.to_path_buf(),
            unchecked: AtomicU64::new(u64::MAX / 2),
            checked_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }))
    }

    /// Writes `batch`, synced when `durable` (and syncing is on), once the disk has room.
    pub(crate) fn write(&self, batch: rocksdb::WriteBatch, durable: bool) -> Result<()> {
        self.check_space_for(batch.size_in_bytes() as u64)?;
        self.db.write_opt(batch, &self.write_opts(durable))?;
        Ok(())
    }

    /// Refuses a write of `bytes` when the data dir's filesystem has less than `min_free_bytes`
    /// free (for an unprivileged process: root may use the blocks reserved for it, RocksDB may
    /// not count on them). Looks the free space up only when due (see [`RECHECK_SHARE`]).
    fn check_space_for(&self, bytes: u64) -> Result<()> {
        let reserve = self.opts.min_free_bytes;
        if reserve == 0 {
            return Ok(());
        }
        let written = self
            .unchecked
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        let now_ms = self.opened.elapsed().as_millis() as u64;
        let since = now_ms.saturating_sub(self.checked_ms.load(Ordering::Relaxed));
        if written < reserve / RECHECK_SHARE && since < RECHECK_AFTER.as_millis() as u64 {
            return Ok(());
        }
        let st = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| StorageError::Io {
            path: self.dir.display().to_string(),
            source: e.into(),
        })?;
        #[allow(clippy::useless_conversion)] // the field types differ between targets
        let free = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
        if free < reserve {
            // Not reset: every later write looks again.
            return Err(StorageError::DiskFull {
                path: self.dir.display().to_string(),
                free,
                reserve,
            });
        }
        self.unchecked.store(0, Ordering::Relaxed);
        self.checked_ms.store(now_ms, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily(name))
    }

    fn write_opts(&self, durable: bool) -> rocksdb::WriteOptions {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(durable && self.opts.sync);
        w
    }

    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<T>> {
        match self.db.get_pinned_cf(self.cf(cf)?, key)? {
            None => Ok(None),
            Some(bytes) => {
                decode(&bytes, || format!("{cf}/{}", String::from_utf8_lossy(key))).map(Some)
            }
        }
    }
}

/// The write-ahead log file RocksDB's info log (`LOG`) last reported corrupt, and what it said:
/// RocksDB's own error names no file.
fn corrupt_wal(dir: &Path) -> Option<(String, String)> {
    let log = std::fs::read_to_string(dir.join("LOG")).ok()?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(".log: ") && l.contains("Corruption"))?;
    let (before, detail) = line.split_once(".log: ")?;
    let wal = format!("{}.log", before.rsplit(' ').next()?);
    Some((wal, detail.trim().to_string()))
}

/// Options of [`CF_SM_DATA`]. Applying a put looks its key up first (to keep per-map entry
/// counts exact), and most replicated keys are new: whole-key bloom filters, in the memtable and
/// in every table file, answer "absent" without searching either.
fn data_cf_options() -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.1);
    opts
}

pub(crate) fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|source| StorageError::Encode { what, source })
}

pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|source| StorageError::Decode {
        what: what(),
        source,
    })
}

/// Key of an entry in [`CF_SM_DATA`]: the map name (length-prefixed) then the key bytes, so that
/// one map's entries are contiguous and sorted by key.
pub(crate) fn data_key(map: &str, key: &[u8]) -> Vec<u8> {
    let mut k = map_prefix(map);
    k.extend_from_slice(key);
    k
}

pub(crate) fn map_prefix(map: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + map.len() + 16);
    // Map names are at most MAX_MAP_NAME (64) bytes, validated before anything is stored.
    k.push(map.len() as u8);
    k.extend_from_slice(map.as_bytes());
    k
}

/// Splits a [`CF_SM_DATA`] key into map name and key bytes.
pub(crate) fn split_data_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let len = *k.first()? as usize;
    let name = std::str::from_utf8(k.get(1..1 + len)?).ok()?;
    Some((name, &k[1 + len..]))
}
