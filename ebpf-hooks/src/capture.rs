//! Event-driven capture: BPF programs that report each successful change to a watched map
//! through a ring buffer. The `syscall` backend (tracepoints on bpf(2)) works on kernels that
//! refuse tracing programs; it sees changes made through syscalls, not those BPF programs make,
//! which the scan covers.

use std::fmt;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{include_bytes_aligned, Btf, Ebpf, EbpfLoader};
use tokio::io::unix::AsyncFd;

use crate::{HookError, Result};

static CAPTURE_SYSCALL: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture_syscall.bpf.o"));

/// Largest key the event-driven backends carry; larger maps are covered by the scan alone.
pub const MAX_EVENT_KEY: u32 = 128;
/// Largest value the event-driven backends carry.
pub const MAX_EVENT_VALUE: u32 = 1024;
const EVENT_SIZE: usize = 16 + MAX_EVENT_KEY as usize + MAX_EVENT_VALUE as usize;

/// How changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// fexit on the kernel's hash map functions: syscalls and BPF programs alike.
    Fexit,
    /// tracepoints on bpf(2): syscalls only.
    Syscall,
    /// Periodic diff only.
    Scan,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Fexit => "fexit",
            Backend::Syscall => "syscall",
            Backend::Scan => "scan",
        })
    }
}

/// One successful change to a watched map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureEvent {
    /// Kernel id of the map.
    pub map_id: u32,
    pub key: Vec<u8>,
    /// `None`: the key was deleted.
    pub value: Option<Vec<u8>>,
}

fn parse(b: &[u8]) -> Option<CaptureEvent> {
    if b.len() < EVENT_SIZE {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let (map_id, op, ks, vs) = (
        u32_at(0),
        u32_at(4),
        u32_at(8) as usize,
        u32_at(12) as usize,
    );
    if ks > MAX_EVENT_KEY as usize || vs > MAX_EVENT_VALUE as usize {
        return None;
    }
    let key = b[16..16 + ks].to_vec();
    let value = match op {
        1 => Some(b[16 + MAX_EVENT_KEY as usize..16 + MAX_EVENT_KEY as usize + vs].to_vec()),
        2 => None,
        _ => return None,
    };
    Some(CaptureEvent { map_id, key, value })
}

fn err(call: &'static str) -> impl Fn(String) -> HookError {
    move |e| HookError::Syscall {
        call,
        map: "capture".into(),
        source: std::io::Error::other(e),
    }
}

/// A loaded, attached event-driven capture backend.
pub struct Capture {
    backend: Backend,
    _ebpf: Ebpf,
    events: AsyncFd<RingBuf<MapData>>,
    watched: BpfHashMap<MapData, u32, u8>,
    drops: Array<MapData, u64>,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Loads and attaches the syscall backend. Must run inside a tokio runtime.
    pub fn syscall() -> Result<Self> {
        let btf = Btf::from_sys_fs()
            .map_err(|e| err("BTF")(format!("reading /sys/kernel/btf/vmlinux: {e}")))?;
        let tgid = std::process::id();
        #[allow(deprecated)] // `override_global` is not in every 0.14 point release's docs
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .set_global("rm_self_tgid", &tgid, true)
            .load(CAPTURE_SYSCALL)
            .map_err(|e| err("BPF_PROG_LOAD")(e.to_string()))?;
        for (prog, tp) in [("rm_sys_enter", "sys_enter"), ("rm_sys_exit", "sys_exit")] {
            let p: &mut BtfTracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| err("BPF_PROG_LOAD")(format!("{prog} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| err("BPF_PROG_LOAD")(e.to_string()))?;
            p.load(tp, &btf)
                .map_err(|e| err("BPF_PROG_LOAD")(format!("{prog}: {e}")))?;
            p.attach()
                .map_err(|e| err("BPF_RAW_TRACEPOINT_OPEN")(format!("{prog}: {e}")))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| err("BPF_MAP_CREATE")(format!("map {name} missing")))
        };
        let ring = RingBuf::try_from(take(&mut ebpf, "rm_events")?)
            .map_err(|e| err("ring buffer")(e.to_string()))?;
        let events = crate::sys::async_ring(ring).map_err(|e| err("ring buffer")(e.to_string()))?;
        let watched = BpfHashMap::try_from(take(&mut ebpf, "rm_watched")?)
            .map_err(|e| err("rm_watched")(e.to_string()))?;
        let drops = Array::try_from(take(&mut ebpf, "rm_drops")?)
            .map_err(|e| err("rm_drops")(e.to_string()))?;
        Ok(Self {
            backend: Backend::Syscall,
            _ebpf: ebpf,
            events,
            watched,
            drops,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts reporting changes to the map with this kernel id.
    pub fn watch(&mut self, map_id: u32) -> Result<()> {
        self.watched
            .insert(map_id, 1, 0)
            .map_err(|e| err("BPF_MAP_UPDATE_ELEM")(e.to_string()))
    }

    /// Stops reporting changes to the map with this kernel id.
    pub fn unwatch(&mut self, map_id: u32) -> Result<()> {
        match self.watched.remove(&map_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err("BPF_MAP_DELETE_ELEM")(e.to_string())),
        }
    }

    /// Changes the programs saw but could not forward: `(lost, not decoded)`. When either moves,
    /// the watched maps must be scanned.
    pub fn drops(&self) -> Result<(u64, u64)> {
        let get = |i| {
            self.drops
                .get(&i, 0)
                .map_err(|e| err("rm_drops")(e.to_string()))
        };
        Ok((get(0)?, get(1)?))
    }

    /// Waits for events and appends every available one to `out`.
    pub async fn next_events(&mut self, out: &mut Vec<CaptureEvent>) -> Result<()> {
        loop {
            let mut guard = self
                .events
                .readable_mut()
                .await
                .map_err(|e| err("ring buffer")(e.to_string()))?;
            let ring = guard.get_inner_mut();
            let before = out.len();
            while let Some(item) = ring.next() {
                if let Some(ev) = parse(&item) {
                    out.push(ev);
                }
            }
            guard.clear_ready();
            if out.len() > before {
                return Ok(());
            }
        }
    }
}
