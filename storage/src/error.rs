//! Errors of the storage crate.

use serde::{Deserialize, Serialize};

/// Why a client batch was refused. Every variant names the map and the offending sizes, so that
/// the message a user sees says what to fix. Deterministic and replicated: it is part of the
/// state machine's response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ValidationError {
    #[error("unknown map {0:?}: declare it first")]
    UnknownMap(String),
    #[error("unknown map type {0:?}: expected hash, lru_hash or array")]
    UnknownMapType(String),
    #[error("invalid map name {0:?}: use 1 to 64 characters from [A-Za-z0-9_.-]")]
    BadMapName(String),
    #[error("invalid schema for map {map}: {reason}")]
    BadSchema { map: String, reason: String },
    #[error("map already declared as {existing}, refusing {requested}")]
    SchemaConflict { existing: String, requested: String },
    #[error("cannot declare map {map}: the cluster already holds {limit} maps, the most it may")]
    TooManyMaps { map: String, limit: usize },
    #[error("dropping map {0} must be the only operation of its batch")]
    DropNotAlone(String),
    #[error("map {map}: key is {actual} bytes, the schema says {expected}")]
    KeySize {
        map: String,
        expected: u32,
        actual: usize,
    },
    #[error("map {map}: value is {actual} bytes, the schema says {expected}")]
    ValueSize {
        map: String,
        expected: u32,
        actual: usize,
    },
    #[error("map {map}: array index {index} is out of range (max entries {max_entries})")]
    ArrayIndex {
        map: String,
        index: u32,
        max_entries: u32,
    },
    #[error("map {0}: entries of an array map cannot be deleted")]
    ArrayDelete(String),
    #[error("map {map} is full ({max_entries} entries)")]
    MapFull { map: String, max_entries: u32 },
    #[error("empty batch: nothing to write")]
    EmptyBatch,
    #[error("batch too large: {actual} {what}, the limit is {limit}")]
    BatchTooLarge {
        what: String,
        actual: usize,
        limit: usize,
    },
}

impl ValidationError {
    /// Refused for the size of the batch, not for anything in it: the same operations in
    /// smaller batches may be taken.
    pub fn is_size_limit(&self) -> bool {
        matches!(self, ValidationError::BatchTooLarge { .. })
    }
}

/// Failures of the storage layer itself.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("the write-ahead log {wal} is corrupt ({detail}); refusing to start rather than drop the records after it, which may be acknowledged writes: restore the data dir, or remove it and add this machine back as a new node")]
    CorruptWal { wal: String, detail: String },
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{what}: {reason}")]
    BadSnapshot { what: String, reason: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the filesystem of {path} has {free} bytes free, under the {reserve} this node keeps in reserve (--min-free-disk-bytes): the node stops before its disk is full; free space, then restart it")]
    DiskFull {
        path: String,
        free: u64,
        reserve: u64,
    },
    #[error("column family {0} is missing: the database is not a raftmap data dir")]
    MissingColumnFamily(&'static str),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
