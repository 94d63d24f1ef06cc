//! Which kernel maps a node watches (`--watch NAME=LOCATION`) and how it knows them again: the
//! schema a kernel map implies, and `kernel-maps.json`, the kernel id each map had when last
//! seen (an unchanged id after a restart means the map outlived the daemon).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use raftmap_ebpf_hooks::{HookError, KernelMap, MapKind, MapLayout};
use raftmap_storage::{MapSchema, MapType};
use serde::Deserialize;

use crate::error::NodeError;

/// A watched map: its cluster-wide name and where the kernel map is on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Name of the replicated map.
    pub map: String,
    /// bpffs path of the kernel map.
    pub pin: Option<PathBuf>,
    /// Or: the kernel map's name (must be unique among loaded maps).
    pub kernel_name: Option<String>,
}

impl std::str::FromStr for WatchSpec {
    type Err = String;
    /// `NAME=/sys/fs/bpf/PATH` (pinned) or `NAME=KERNEL_MAP_NAME`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (map, target) = s.split_once('=').ok_or_else(|| {
            format!("--watch {s:?}: expected NAME=/bpffs/path or NAME=kernel_map_name")
        })?;
        raftmap_storage::validate_map_name(map).map_err(|e| format!("--watch {s:?}: {e}"))?;
        let (pin, kernel_name) = if target.starts_with('/') {
            (Some(PathBuf::from(target)), None)
        } else if !target.is_empty() {
            (None, Some(target.to_string()))
        } else {
            return Err(format!("--watch {s:?}: empty map location"));
        };
        Ok(WatchSpec {
            map: map.to_string(),
            pin,
            kernel_name,
        })
    }
}

impl WatchSpec {
    pub(super) fn open(&self) -> Result<KernelMap, HookError> {
        match (&self.pin, &self.kernel_name) {
            (Some(p), _) => KernelMap::open_pinned(p),
            (None, Some(n)) => KernelMap::open_by_name(n),
            (None, None) => Err(HookError::NotFound(self.map.clone())),
        }
    }

    pub(super) fn location(&self) -> String {
        match (&self.pin, &self.kernel_name) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(n)) => format!("kernel map {n:?}"),
            (None, None) => "nowhere".into(),
        }
    }
}

/// An error and every error under it, as one line (`opening map X: BPF_OBJ_GET failed: No
/// such file or directory`).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut refused = false;
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        refused |= s
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|errno| errno == nix::errno::Errno::EPERM as i32);
        cur = s.source();
    }
    if refused {
        out.push_str(PERMISSION_HINT);
    }
    out
}

/// What a refused bpf(2) usually means in a container.
const PERMISSION_HINT: &str = " (the kernel refused bpf(2): the agent needs CAP_BPF and CAP_PERFMON, and a seccomp profile that allows bpf; in a container, the runtime's default profile blocks it: see deploy/README.md)";

/// The replicated schema a kernel map of this layout implies.
pub(super) fn schema_of(name: &str, l: &MapLayout) -> MapSchema {
    MapSchema {
        name: name.to_string(),
        map_type: match l.kind {
            MapKind::Hash => MapType::Hash,
            MapKind::LruHash => MapType::LruHash,
            MapKind::Array => MapType::Array,
        },
        key_size: l.key_size,
        value_size: l.value_size,
        max_entries: l.max_entries,
    }
}

/// `kernel-maps.json`: the kernel id of each watched map, and the boot it was seen in.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
pub(crate) struct RecordedIds {
    boot_id: String,
    ids: BTreeMap<String, u32>,
}

/// The contents of `kernel-maps.json`, if they are well formed.
pub(crate) fn parse_recorded_ids(bytes: &[u8]) -> Option<RecordedIds> {
    serde_json::from_slice(bytes).ok()
}

/// This boot's id (a map id from another boot says nothing about the map now).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The map ids recorded in the data dir.
#[derive(Debug)]
pub(super) struct IdBook {
    path: PathBuf,
}

impl IdBook {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("kernel-maps.json"),
        }
    }

    /// Map ids recorded in this boot. Kernel map ids restart after a reboot, so an id is only
    /// meaningful together with the boot it was seen in.
    pub fn load(&self) -> BTreeMap<String, u32> {
        // Unreadable (missing, corrupt): no map is known, each is adopted as on first sight.
        let recorded = std::fs::read(&self.path)
            .ok()
            .and_then(|b| parse_recorded_ids(&b));
        let boot = boot_id();
        match recorded {
            // Without a boot id nothing tells an id of this boot from a recycled one.
            Some(r) if !boot.is_empty() && r.boot_id == boot => r.ids,
            _ => BTreeMap::new(),
        }
    }

    pub fn save(&self, map: &str, id: u32) {
        let mut ids = self.load();
        ids.insert(map.to_string(), id);
        let recorded = RecordedIds {
            boot_id: boot_id(),
            ids,
        };
        let res = serde_json::to_vec(&recorded)
            .map_err(|e| NodeError::Encode {
                what: "kernel map ids",
                source: e.into(),
            })
            .and_then(|b| crate::identity::write_atomic(&self.path, &b));
        if let Err(e) = res {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot record kernel map ids");
        }
    }
}
