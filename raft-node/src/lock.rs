//! The one way the node takes a mutex.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, whether or not a thread panicked while holding it. Every mutex of the node guards
/// state that stays usable after a panic half-way through an update: caches and counters that
/// the next update overwrites, and the kernel sync's per-map state, which the next
/// reconciliation of the map rebuilds from the committed state and the kernel.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
