//! raftmap's replicated state: the data model (named maps with schemas, batched operations),
//! its validation, and openraft's log storage and state machine on one RocksDB database.
//!
//! ```text
//! proposal ──> LogStore (CF log, fsync per append) ──commit──> StateMachine (CF sm_*) ──> StateView
//! ```
//!
//! [`open`] returns the three handles a node needs: the log store and state machine (moved into
//! openraft) and a [`StateView`] for reads and change notifications.

mod db;
mod digest;
mod error;
mod log_store;
mod model;
mod snapshot;
mod state_machine;

use std::path::Path;
use std::sync::Arc;

pub use db::{StoreOptions, DEFAULT_MIN_FREE_BYTES};
pub use digest::{disagreement, Disagreement, Recomputed, CHECKPOINT_EVERY};
pub use error::{StorageError, ValidationError};
pub use log_store::LogStore;
pub use model::*;
pub use snapshot::check_snapshot_data;
pub use state_machine::{
    ApplyHook, Change, MapContents, MapEntries, SmEvent, SnapshotBuilder, StateMachine, StateView,
};

/// Opens (creating if needed) the store under `dir`: RocksDB in `dir/db`, the current snapshot in
/// `dir/snapshot.bin`. `hook`, if any, sees every committed change as it is applied.
pub fn open(
    dir: &Path,
    opts: StoreOptions,
    hook: Option<Arc<dyn ApplyHook>>,
) -> Result<(LogStore, StateMachine, StateView), StorageError> {
    std::fs::create_dir_all(dir).map_err(|source| StorageError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let db = db::Db::open(&dir.join("db"), opts)?;
    let log = LogStore::new(db.clone())?;
    let (sm, view) = StateMachine::new(db, dir.join("snapshot.bin"), hook)?;
    Ok((log, sm, view))
}
