//! The one way the harness takes a mutex.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, whether or not a thread panicked while holding it: every mutex of the harness
/// guards lists (events, keys, members, nodes) that stay whole whatever a panicking holder did.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
