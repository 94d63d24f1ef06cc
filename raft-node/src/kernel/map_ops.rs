//! The seam between the sync and a kernel map: the few map operations the sync uses, behind a
//! trait that [`KernelMap`] implements with syscalls and that tests implement in memory
//! ([`FakeMap`]), so that the sync's rules run without root.

use std::fmt::Debug;

use raftmap_ebpf_hooks::{Entries, HookError, KernelMap, MapLayout, UpdateFlags};

/// What the sync does to a kernel map.
pub(crate) trait MapOps: Debug + Send + Sync {
    fn layout(&self) -> &MapLayout;
    fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, HookError>;
    /// Creates or overwrites `key`.
    fn update(&self, key: &[u8], value: &[u8]) -> Result<(), HookError>;
    /// Deletes `key`; `Ok(false)` when it was not there.
    fn delete(&self, key: &[u8]) -> Result<bool, HookError>;
    /// Writes entries in one call; on error, the entries before the returned count were
    /// written.
    fn update_batch(&self, entries: &[(&[u8], &[u8])]) -> Result<(), (usize, HookError)>;
    /// Every entry.
    fn walk(&self) -> Result<Entries, HookError>;
}

impl MapOps for KernelMap {
    fn layout(&self) -> &MapLayout {
        KernelMap::layout(self)
    }
    fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, HookError> {
        KernelMap::lookup(self, key)
    }
    fn update(&self, key: &[u8], value: &[u8]) -> Result<(), HookError> {
        KernelMap::update(self, key, value, UpdateFlags::Any)
    }
    fn delete(&self, key: &[u8]) -> Result<bool, HookError> {
        KernelMap::delete(self, key)
    }
    fn update_batch(&self, entries: &[(&[u8], &[u8])]) -> Result<(), (usize, HookError)> {
        KernelMap::update_batch(self, entries)
    }
    fn walk(&self) -> Result<Entries, HookError> {
        KernelMap::walk(self)
    }
}

#[cfg(test)]
pub(crate) use fake::FakeMap;

#[cfg(test)]
mod fake {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use raftmap_ebpf_hooks::{Entries, HookError, MapKind, MapLayout};

    use super::MapOps;
    use crate::lock::lock;

    /// What the kernel answers a put of a new key into a full hash map.
    const E2BIG: i32 = 7;

    /// A hash map in memory that behaves as the kernel's does for the sync: a fixed key and
    /// value size, `max_entries` (a put of a new key into a full map fails with E2BIG), and a
    /// record of every write, to check what the sync did and in which order.
    #[derive(Debug)]
    pub(crate) struct FakeMap {
        layout: MapLayout,
        state: Mutex<FakeState>,
    }

    #[derive(Debug, Default)]
    struct FakeState {
        entries: BTreeMap<Vec<u8>, Vec<u8>>,
        /// Every successful write: the key and its new value (`None`: deleted).
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    }

    impl FakeMap {
        pub(crate) fn new(id: u32, key_size: u32, value_size: u32, max_entries: u32) -> Self {
            Self {
                layout: MapLayout {
                    kind: MapKind::Hash,
                    key_size,
                    value_size,
                    max_entries,
                    id,
                    name: format!("fake{id}"),
                },
                state: Mutex::new(FakeState::default()),
            }
        }

        /// What the map holds.
        pub(crate) fn contents(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
            lock(&self.state).entries.clone()
        }

        /// Writes made to the map since the last call, in order.
        pub(crate) fn take_writes(&self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
            std::mem::take(&mut lock(&self.state).writes)
        }

        /// A write by someone else (a BPF program, a syscall of another process): not recorded
        /// among the sync's writes.
        pub(crate) fn local_write(&self, key: &[u8], value: Option<&[u8]>) {
            let mut st = lock(&self.state);
            match value {
                Some(v) => st.entries.insert(key.to_vec(), v.to_vec()),
                None => st.entries.remove(key),
            };
        }

        fn err(&self, call: &'static str, errno: i32) -> HookError {
            HookError::Syscall {
                call,
                map: self.layout.name.clone(),
                source: std::io::Error::from_raw_os_error(errno),
            }
        }
    }

    impl MapOps for FakeMap {
        fn layout(&self) -> &MapLayout {
            &self.layout
        }
        fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, HookError> {
            Ok(lock(&self.state).entries.get(key).cloned())
        }
        fn update(&self, key: &[u8], value: &[u8]) -> Result<(), HookError> {
            let mut st = lock(&self.state);
            if !st.entries.contains_key(key) && st.entries.len() >= self.layout.max_entries as usize
            {
                return Err(self.err("BPF_MAP_UPDATE_ELEM", E2BIG));
            }
            st.entries.insert(key.to_vec(), value.to_vec());
            st.writes.push((key.to_vec(), Some(value.to_vec())));
            Ok(())
        }
        fn delete(&self, key: &[u8]) -> Result<bool, HookError> {
            let mut st = lock(&self.state);
            let was = st.entries.remove(key).is_some();
            if was {
                st.writes.push((key.to_vec(), None));
            }
            Ok(was)
        }
        fn update_batch(&self, entries: &[(&[u8], &[u8])]) -> Result<(), (usize, HookError)> {
            for (i, (k, v)) in entries.iter().enumerate() {
                self.update(k, v).map_err(|e| (i, e))?;
            }
            Ok(())
        }
        fn walk(&self) -> Result<Entries, HookError> {
            let st = lock(&self.state);
            Ok(Entries::from_pairs(
                self.layout.key_size as usize,
                self.layout.value_size as usize,
                st.entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
            ))
        }
    }
}
