//! openraft's own storage conformance suite, run against the RocksDB log and state machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use raftmap_storage::{open, LogStore, StateMachine, StoreOptions, TypeConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm, _view) = open(dir.path(), StoreOptions::default(), None).expect("open store");
        Ok((dir, log, sm))
    }
}

#[tokio::test]
#[allow(clippy::result_large_err)] // openraft's error type
async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await
}
