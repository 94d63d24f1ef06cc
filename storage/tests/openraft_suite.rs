//! openraft's own storage conformance suite, run against the RocksDB log and state machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use openraft::testing::{StoreBuilder, Suite};
use raftmap_storage::{open, LogStore, NodeId, StateMachine, StoreOptions, TypeConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachine), openraft::StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm, _view) = open(dir.path(), StoreOptions::default(), None).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
#[allow(clippy::result_large_err)] // openraft's error type
fn openraft_storage_suite() -> Result<(), openraft::StorageError<NodeId>> {
    Suite::test_all(Builder)
}
