//! raftmap's kernel side: BPF maps found by pinned path or by name and read and written with
//! key and value sizes known only at run time, and the scan that turns a map's differences from
//! its last known contents into changes to replicate.
//!
//! This crate knows nothing about Raft: it sees kernel maps and byte strings.

mod capture;
mod guest;
mod programs;
mod scan;
mod sys;

use std::collections::HashMap;
use std::fmt;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};

pub use capture::{
    parse_record, Backend, Capture, CaptureEvent, EchoFilter, MAX_EVENT_KEY, MAX_EVENT_VALUE,
};
pub use guest::{run_in_guest, GuestRun, GUEST_KERNELS};
pub use programs::{Conntrack, CT_KEY_SIZE, CT_VALUE_SIZE};
pub use scan::{diff, shadow_from, Contents, KernelChange, Shadow, ShadowKey};

/// Errors of kernel map access.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{call} on map {map}: {source}")]
    Syscall {
        call: &'static str,
        map: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening map {what}: {source}")]
    Open {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no loaded BPF map is named {0:?}")]
    NotFound(String),
    #[error(
        "{count} loaded BPF maps are named {name:?} (ids {ids:?}); name it by pinned path instead"
    )]
    Ambiguous {
        name: String,
        count: usize,
        ids: Vec<u32>,
    },
    #[error("map {map} is a {kind} map; raftmap replicates hash, lru_hash and array maps")]
    UnsupportedType { map: String, kind: String },
    #[error("map {map}: key is {actual} bytes, the map's key size is {expected}")]
    KeySize {
        map: String,
        expected: u32,
        actual: usize,
    },
    #[error("map {map}: value is {actual} bytes, the map's value size is {expected}")]
    ValueSize {
        map: String,
        expected: u32,
        actual: usize,
    },
}

pub type Result<T, E = HookError> = std::result::Result<T, E>;

/// Lowers the calling thread's priority by 10 nice levels (about a tenth of its process's other
/// threads' share of a busy CPU): for a thread that walks large maps in the background, so
/// that it yields to latency-bound work without being starved when the machine is saturated.
pub fn set_thread_background_priority() -> std::io::Result<()> {
    sys::lower_thread_priority(10)
}

/// The kinds of kernel map raftmap replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
}

impl MapKind {
    fn bpf_type(self) -> u32 {
        match self {
            MapKind::Hash => MapType::Hash as u32,
            MapKind::LruHash => MapType::LruHash as u32,
            MapKind::Array => MapType::Array as u32,
        }
    }
}

impl fmt::Display for MapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapKind::Hash => "hash",
            MapKind::LruHash => "lru_hash",
            MapKind::Array => "array",
        })
    }
}

/// A kernel map's shape, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLayout {
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Node-local id; changes when the map is recreated.
    pub id: u32,
    pub name: String,
}

impl fmt::Display for MapLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}({}, key {} B, value {} B, max {} entries, id {})",
            self.name, self.kind, self.key_size, self.value_size, self.max_entries, self.id
        )
    }
}

/// Update flags of BPF_MAP_UPDATE_ELEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateFlags {
    /// Create or overwrite (BPF_ANY).
    Any = 0,
    /// Create only (BPF_NOEXIST).
    NoExist = 1,
    /// Overwrite only (BPF_EXIST).
    Exist = 2,
}

/// An open kernel map.
#[derive(Debug)]
pub struct KernelMap {
    data: MapData,
    layout: MapLayout,
    label: String,
}

impl KernelMap {
    fn from_data(data: MapData, label: String) -> Result<Self> {
        let info = data.info().map_err(|source| HookError::Open {
            what: label.clone(),
            source,
        })?;
        let name = info.name_as_str().unwrap_or("").to_string();
        let kind = match info.map_type() {
            Ok(MapType::Hash) => MapKind::Hash,
            Ok(MapType::LruHash) => MapKind::LruHash,
            Ok(MapType::Array) => MapKind::Array,
            Ok(other) => {
                return Err(HookError::UnsupportedType {
                    map: label,
                    kind: format!("{other:?}"),
                })
            }
            Err(e) => {
                return Err(HookError::UnsupportedType {
                    map: label,
                    kind: e.to_string(),
                })
            }
        };
        let layout = MapLayout {
            kind,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            id: info.id(),
            name,
        };
        Ok(Self {
            data,
            layout,
            label,
        })
    }

    /// Opens the map pinned at `path` (under bpffs).
    pub fn open_pinned(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let data = MapData::from_pin(path).map_err(|source| HookError::Open {
            what: label.clone(),
            source,
        })?;
        Self::from_data(data, label)
    }

    /// Opens the only loaded map with this name (kernel map names are at most 15 bytes).
    pub fn open_by_name(name: &str) -> Result<Self> {
        let mut ids = Vec::new();
        for info in aya::maps::loaded_maps() {
            let info = info.map_err(|source| HookError::Open {
                what: format!("loaded maps (looking for {name:?})"),
                source,
            })?;
            if info.name_as_str() == Some(name) {
                ids.push(info.id());
            }
        }
        match ids.as_slice() {
            [] => Err(HookError::NotFound(name.to_string())),
            [id] => {
                let data = MapData::from_id(*id).map_err(|source| HookError::Open {
                    what: format!("{name:?} (id {id})"),
                    source,
                })?;
                Self::from_data(data, name.to_string())
            }
            _ => Err(HookError::Ambiguous {
                name: name.to_string(),
                count: ids.len(),
                ids,
            }),
        }
    }

    /// Creates a new map (for tests and the demo; production maps belong to their programs).
    pub fn create(
        kind: MapKind,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: &str,
    ) -> Result<Self> {
        let fd = sys::map_create(kind.bpf_type(), key_size, value_size, max_entries, name)
            .map_err(|source| HookError::Syscall {
                call: "BPF_MAP_CREATE",
                map: name.to_string(),
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(|source| HookError::Open {
            what: name.to_string(),
            source,
        })?;
        Self::from_data(data, name.to_string())
    }

    /// Pins the map at `path` under bpffs.
    pub fn pin(&self, path: &Path) -> Result<()> {
        self.data.pin(path).map_err(|e| HookError::Syscall {
            call: "BPF_OBJ_PIN",
            map: self.label.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    pub fn layout(&self) -> &MapLayout {
        &self.layout
    }

    /// How the map was named when opened (pinned path or name).
    pub fn label(&self) -> &str {
        &self.label
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.len() != self.layout.key_size as usize {
            return Err(HookError::KeySize {
                map: self.label.clone(),
                expected: self.layout.key_size,
                actual: key.len(),
            });
        }
        Ok(())
    }

    fn syscall_err(&self, call: &'static str) -> impl FnOnce(std::io::Error) -> HookError + '_ {
        move |source| HookError::Syscall {
            call,
            map: self.label.clone(),
            source,
        }
    }

    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_key(key)?;
        let mut value = vec![0u8; self.layout.value_size as usize];
        let found = sys::lookup(self.data.fd().as_fd(), key, &mut value)
            .map_err(self.syscall_err("BPF_MAP_LOOKUP_ELEM"))?;
        Ok(found.then_some(value))
    }

    pub fn update(&self, key: &[u8], value: &[u8], flags: UpdateFlags) -> Result<()> {
        self.check_key(key)?;
        if value.len() != self.layout.value_size as usize {
            return Err(HookError::ValueSize {
                map: self.label.clone(),
                expected: self.layout.value_size,
                actual: value.len(),
            });
        }
        sys::update(self.data.fd().as_fd(), key, value, flags as u64)
            .map_err(self.syscall_err("BPF_MAP_UPDATE_ELEM"))
    }

    /// Writes many entries with one BPF_MAP_UPDATE_BATCH call (BPF_ANY). On error, the entries
    /// before the returned count were written.
    pub fn update_batch(
        &self,
        entries: &[(&[u8], &[u8])],
    ) -> std::result::Result<(), (usize, HookError)> {
        let (ks, vs) = (
            self.layout.key_size as usize,
            self.layout.value_size as usize,
        );
        let mut keys = Vec::with_capacity(entries.len() * ks);
        let mut values = Vec::with_capacity(entries.len() * vs);
        for (k, v) in entries {
            self.check_key(k).map_err(|e| (0, e))?;
            if v.len() != vs {
                return Err((
                    0,
                    HookError::ValueSize {
                        map: self.label.clone(),
                        expected: self.layout.value_size,
                        actual: v.len(),
                    },
                ));
            }
            keys.extend_from_slice(k);
            values.extend_from_slice(v);
        }
        let mut count = entries.len() as u32;
        sys::update_batch(self.data.fd().as_fd(), &keys, &values, &mut count)
            .map_err(|e| (count as usize, self.syscall_err("BPF_MAP_UPDATE_BATCH")(e)))
    }

    /// Deletes many keys with one BPF_MAP_DELETE_BATCH call. On error (a missing key is one),
    /// the keys before the returned count were deleted.
    pub fn delete_batch(&self, keys: &[&[u8]]) -> std::result::Result<(), (usize, HookError)> {
        let mut packed = Vec::with_capacity(keys.len() * self.layout.key_size as usize);
        for k in keys {
            self.check_key(k).map_err(|e| (0, e))?;
            packed.extend_from_slice(k);
        }
        let mut count = keys.len() as u32;
        sys::delete_batch(self.data.fd().as_fd(), &packed, &mut count)
            .map_err(|e| (count as usize, self.syscall_err("BPF_MAP_DELETE_BATCH")(e)))
    }

    /// Deletes `key`; `Ok(false)` when it was not there.
    pub fn delete(&self, key: &[u8]) -> Result<bool> {
        self.check_key(key)?;
        sys::delete(self.data.fd().as_fd(), key).map_err(self.syscall_err("BPF_MAP_DELETE_ELEM"))
    }

    /// Every entry, keyed by key bytes, read in batches (BPF_MAP_LOOKUP_BATCH), or key by key
    /// where the kernel has no batch lookup for the map. Entries changed during the walk may
    /// or may not appear with their new value.
    pub fn entries(&self) -> Result<HashMap<Vec<u8>, Vec<u8>>> {
        Ok(self.walk()?.into_map())
    }

    /// Every entry, like [`entries`](Self::entries), stored flat: two allocations whatever
    /// the map's size, for walks that only compare.
    pub fn walk(&self) -> Result<Entries> {
        match self.entries_batched() {
            Err(HookError::Syscall { source, .. })
                // ENOTSUPP (524) is the kernel's own "not supported" code.
                if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | 524)) =>
            {
                let (ks, vs) = (self.layout.key_size as usize, self.layout.value_size as usize);
                let mut flat = Entries::new(ks, vs);
                for (k, v) in self.entries_by_key()? {
                    flat.push(&k, &v);
                }
                Ok(flat)
            }
            other => other,
        }
    }

    fn entries_batched(&self) -> Result<Entries> {
        let fd = self.data.fd().as_fd();
        let (ks, vs) = (
            self.layout.key_size as usize,
            self.layout.value_size as usize,
        );
        let token_len = ks.max(8);
        let mut out = Entries::new(ks, vs);
        let mut cap: usize = 1024.min(self.layout.max_entries.max(1) as usize);
        let mut token: Option<Vec<u8>> = None;
        let mut next = vec![0u8; token_len];
        let mut keys = vec![0u8; cap * ks];
        let mut values = vec![0u8; cap * vs];
        loop {
            let mut count = cap as u32;
            let more = match sys::lookup_batch(
                fd,
                token.as_deref(),
                &mut next,
                &mut keys,
                &mut values,
                &mut count,
            ) {
                Ok(more) => more,
                // A hash bucket holds more entries than fit: retry the same step with room.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && cap < (1 << 20) => {
                    cap *= 2;
                    keys.resize(cap * ks, 0);
                    values.resize(cap * vs, 0);
                    continue;
                }
                Err(e) => return Err(self.syscall_err("BPF_MAP_LOOKUP_BATCH")(e)),
            };
            // A hash map's walk visits each bucket once, and a key lives in one bucket: no
            // key comes twice.
            let n = (count as usize).min(cap);
            out.keys.extend_from_slice(&keys[..n * ks]);
            out.values.extend_from_slice(&values[..n * vs]);
            if !more {
                return Ok(out);
            }
            token = Some(next.clone());
        }
    }

    fn entries_by_key(&self) -> Result<HashMap<Vec<u8>, Vec<u8>>> {
        let fd = self.data.fd().as_fd();
        let ks = self.layout.key_size as usize;
        let mut out = HashMap::new();
        let mut key: Option<Vec<u8>> = None;
        let mut next = vec![0u8; ks];
        // A deleted cursor key restarts the walk from the first key; bound the steps.
        let limit = 2 * self.layout.max_entries as usize + 16;
        for _ in 0..limit {
            let more = sys::next_key(fd, key.as_deref(), &mut next)
                .map_err(self.syscall_err("BPF_MAP_GET_NEXT_KEY"))?;
            if !more {
                break;
            }
            if !out.contains_key(&next) {
                let mut value = vec![0u8; self.layout.value_size as usize];
                if sys::lookup(fd, &next, &mut value)
                    .map_err(self.syscall_err("BPF_MAP_LOOKUP_ELEM"))?
                {
                    out.insert(next.clone(), value);
                }
            }
            key = Some(next.clone());
        }
        Ok(out)
    }
}

/// A map's entries from one walk ([`KernelMap::walk`]), keys and values each in one buffer.
#[derive(Debug, Clone)]
pub struct Entries {
    key_size: usize,
    value_size: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Entries {
    fn new(key_size: usize, value_size: usize) -> Self {
        Self {
            key_size,
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
    }

    /// Entries of `key_size`-byte keys and `value_size`-byte values from `(key, value)` pairs,
    /// as a walk would return them (for code that compares walks, and its tests).
    pub fn from_pairs<'a>(
        key_size: usize,
        value_size: usize,
        pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Self {
        let mut out = Self::new(key_size, value_size);
        for (k, v) in pairs {
            out.push(k, v);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.keys.len().checked_div(self.key_size).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// (key, value) pairs in walk order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        // Key sizes are at least 1 (the kernel refuses 0); value sizes may be 0 in principle.
        let values =
            (0..self.len()).map(|i| &self.values[i * self.value_size..(i + 1) * self.value_size]);
        self.keys.chunks_exact(self.key_size.max(1)).zip(values)
    }

    pub fn into_map<S: std::hash::BuildHasher + Default>(self) -> HashMap<Vec<u8>, Vec<u8>, S> {
        self.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }
}

/// Whether this process can create BPF maps; `Err` says why not.
pub fn probe_bpf() -> std::result::Result<(), String> {
    KernelMap::create(MapKind::Hash, 4, 4, 1, "raftmap_probe")
        .map(drop)
        .map_err(|e| format!("cannot create a BPF map ({e}); raftmap needs root or CAP_BPF and a kernel with BPF"))
}

/// For tests that need BPF: true when it is available. Otherwise the test should return at
/// once: this prints why it is skipped, or panics when `RAFTMAP_REQUIRE_BPF=1` (as in CI), so
/// that a missing capability fails the run instead of skipping silently.
pub fn bpf_or_skip(test: &str) -> bool {
    match probe_bpf() {
        Ok(()) => true,
        Err(e) if std::env::var("RAFTMAP_REQUIRE_BPF").as_deref() == Ok("1") => {
            panic!("{test}: BPF is required (RAFTMAP_REQUIRE_BPF=1): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

/// The default bpffs mount point.
pub fn bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}

#[cfg(test)]
mod tests {
    #[test]
    fn background_priority_is_10_nice_levels_lower_for_the_calling_thread_only() {
        let nice_of = |stat: &str| -> i64 {
            // Field 19 of /proc/.../stat, counted after the parenthesised command name.
            let after = &stat[stat.rfind(')').unwrap_or(0) + 2..];
            after
                .split(' ')
                .nth(16)
                .and_then(|f| f.parse().ok())
                .unwrap_or(i64::MIN)
        };
        let main_before = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        let in_thread = std::thread::spawn(move || {
            super::set_thread_background_priority().unwrap();
            nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(in_thread, (main_before + 10).min(19));
        let main_after = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        assert_eq!(main_after, main_before);
    }
}
