//! Event-driven capture: BPF programs that report each successful change to a watched map
//! through a ring buffer. The `syscall` backend (tracepoints on bpf(2)) works on kernels that
//! refuse tracing programs; it sees changes made through syscalls, not those BPF programs make,
//! which the scan covers.

use std::fmt;
use std::os::fd::AsFd;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::{BtfTracePoint, FExit};
use aya::{include_bytes_aligned, Btf, Ebpf, EbpfLoader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::sys::MappedU32;
use crate::{HookError, Result};

static CAPTURE_SYSCALL: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture_syscall.bpf.o"));
static CAPTURE_FEXIT: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture_fexit.bpf.o"));

/// fexit programs and the kernel functions they attach to; the first four are required.
const FEXIT_HOOKS: &[(&str, &str)] = &[
    ("rm_htab_update", "htab_map_update_elem"),
    ("rm_htab_delete", "htab_map_delete_elem"),
    ("rm_lru_update", "htab_lru_map_update_elem"),
    ("rm_lru_delete", "htab_lru_map_delete_elem"),
    ("rm_htab_lookup_delete", "htab_map_lookup_and_delete_elem"),
    (
        "rm_lru_lookup_delete",
        "htab_lru_map_lookup_and_delete_elem",
    ),
    ("rm_lru_evict", "htab_lru_map_delete_node"),
    ("rm_array_update", "array_map_update_elem"),
];

/// Largest key the event-driven backends carry; larger maps are covered by the scan alone.
pub const MAX_EVENT_KEY: u32 = 128;
/// Largest value the event-driven backends carry.
pub const MAX_EVENT_VALUE: u32 = 1024;
/// Where an event's key and value start (`struct rm_event` in `bpf/raftmap.h`); a record ends
/// after the value's bytes or later.
const KEY_AT: usize = 24;
const VALUE_AT: usize = KEY_AT + MAX_EVENT_KEY as usize;

/// How changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// fexit on the kernel's hash map functions: syscalls and BPF programs alike.
    Fexit,
    /// tracepoints on bpf(2): syscalls only.
    Syscall,
    /// Periodic diff only.
    #[default]
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
    /// `None`: the key was deleted (or evicted).
    pub value: Option<Vec<u8>>,
    /// The key left an LRU map to make room for another.
    pub evicted: bool,
    /// Thread that was current when the change happened (in softirq context, whichever thread
    /// was interrupted: not a reliable author for BPF program writes).
    pub tid: u32,
}

/// Decodes one ring-buffer record of the capture programs (`None`: not a valid record). The
/// bytes come from BPF programs; they are checked as if from anywhere.
pub fn parse_record(b: &[u8]) -> Option<CaptureEvent> {
    if b.len() < VALUE_AT {
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
    let key = b[KEY_AT..KEY_AT + ks].to_vec();
    let (value, evicted) = match op {
        1 => (Some(b.get(VALUE_AT..VALUE_AT + vs)?.to_vec()), false),
        2 => (None, false),
        3 => (None, true),
        _ => return None,
    };
    // The low half of pid_tgid (native endian, as the kernel wrote it): the thread id.
    let tid = u32_at(16);
    Some(CaptureEvent {
        map_id,
        key,
        value,
        evicted,
        tid,
    })
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
    /// Batches of events from the reader thread.
    events: tokio::sync::mpsc::Receiver<Vec<CaptureEvent>>,
    stop: Arc<AtomicBool>,
    watched: BpfHashMap<MapData, u32, u8>,
    drops: Array<MapData, u64>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long the reader pauses after a batch before it looks again (records sent meanwhile do
/// not wake it); under a flood, up to ten times as long.
const POLL_PAUSE: Duration = Duration::from_micros(50);

/// The reader thread: drains the ring buffer into batches. After a batch it pauses, then looks
/// again; when the ring is empty it raises `waits` (`rm_reader_waits`, shared with the
/// programs), looks one last time and sleeps until a record wakes it. Records never wake a
/// reader that has not raised the flag. Ends when the capture is dropped.
fn read_ring(
    mut ring: RingBuf<MapData>,
    waits: MappedU32,
    tx: tokio::sync::mpsc::Sender<Vec<CaptureEvent>>,
    stop: Arc<AtomicBool>,
) {
    crate::sys::tight_timer_slack();
    let drain = |ring: &mut RingBuf<MapData>, batch: &mut Vec<CaptureEvent>| {
        while let Some(item) = ring.next() {
            // Records shorter than an event (the programs' wakeups) are skipped here.
            if let Some(ev) = parse_record(&item) {
                batch.push(ev);
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let mut batch = Vec::new();
        drain(&mut ring, &mut batch);
        if batch.is_empty() {
            // Sequentially consistent: the flag is visible before the ring is read again, and a
            // program commits its record before it reads the flag; either this last look finds
            // the record or the program sees the flag and wakes the poll below.
            waits.value().swap(1, Ordering::SeqCst);
            drain(&mut ring, &mut batch);
            if batch.is_empty() {
                // The timeout bounds a wakeup lost to a full ring.
                if let Err(e) = crate::sys::wait_readable(&ring, 100) {
                    tracing::error!(error = %e, "waiting on the capture ring buffer");
                    return;
                }
            }
            waits.value().store(0, Ordering::SeqCst);
            if batch.is_empty() {
                continue;
            }
        }
        // Under a flood, pause longer (up to ten times): bigger batches and fewer wakeups of
        // the daemon, for at most half a millisecond more latency.
        let pause = POLL_PAUSE * (1 + batch.len() / 64).min(10) as u32;
        // A full channel blocks here, the ring fills and the programs count losses: the
        // daemon then scans, rather than holding unbounded events in memory.
        if tx.blocking_send(batch).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
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
        let (prog, tp) = ("rm_sys_exit", "sys_exit");
        let p: &mut BtfTracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| err("BPF_PROG_LOAD")(format!("{prog} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| err("BPF_PROG_LOAD")(e.to_string()))?;
        p.load(tp, &btf)
            .map_err(|e| err("BPF_PROG_LOAD")(format!("{prog}: {e}")))?;
        p.attach()
            .map_err(|e| err("BPF_RAW_TRACEPOINT_OPEN")(format!("{prog}: {e}")))?;
        Self::from_loaded(Backend::Syscall, ebpf)
    }

    /// Loads and attaches the fexit backend. Must run inside a tokio runtime. Fails on kernels
    /// that refuse tracing programs.
    pub fn fexit() -> Result<Self> {
        let btf = Btf::from_sys_fs()
            .map_err(|e| err("BTF")(format!("reading /sys/kernel/btf/vmlinux: {e}")))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(CAPTURE_FEXIT)
            .map_err(|e| err("BPF_PROG_LOAD")(e.to_string()))?;
        for (i, (prog, func)) in FEXIT_HOOKS.iter().enumerate() {
            let p: &mut FExit = ebpf
                .program_mut(prog)
                .ok_or_else(|| err("BPF_PROG_LOAD")(format!("{prog} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| err("BPF_PROG_LOAD")(e.to_string()))?;
            let res = p
                .load(func, &btf)
                .map_err(|e| format!("loading fexit/{func}: {e}"))
                .and_then(|()| {
                    p.attach()
                        .map(drop)
                        .map_err(|e| format!("attaching fexit/{func}: {e}"))
                });
            match res {
                Ok(()) => {}
                Err(e) if i < 4 => return Err(err("BPF_PROG_LOAD")(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "optional fexit hook unavailable; the scan covers it")
                }
            }
        }
        Self::from_loaded(Backend::Fexit, ebpf)
    }

    /// The best event-driven backend that loads here: fexit, else syscall. The error lists
    /// why each failed.
    pub fn best() -> Result<Self> {
        let fexit = match Self::fexit() {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        Self::syscall()
            .map_err(|sys| err("BPF_PROG_LOAD")(format!("fexit: {fexit}; syscall: {sys}")))
    }

    fn from_loaded(backend: Backend, mut ebpf: Ebpf) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| err("BPF_MAP_CREATE")(format!("map {name} missing")))
        };
        let ring = RingBuf::try_from(take(&mut ebpf, "rm_events")?)
            .map_err(|e| err("ring buffer")(e.to_string()))?;
        let waits = match take(&mut ebpf, "rm_reader_waits")? {
            aya::maps::Map::Array(m) => MappedU32::map(m.fd().as_fd())
                .map_err(|e| err("mmap")(format!("rm_reader_waits: {e}")))?,
            other => {
                return Err(err("rm_reader_waits")(format!(
                    "expected an array map, found {other:?}"
                )))
            }
        };
        let (tx, events) = tokio::sync::mpsc::channel(1024);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("raftmap-capture".into())
            .spawn(move || read_ring(ring, waits, tx, flag))
            .map_err(|e| err("ring buffer")(format!("starting the reader thread: {e}")))?;
        let watched = BpfHashMap::try_from(take(&mut ebpf, "rm_watched")?)
            .map_err(|e| err("rm_watched")(e.to_string()))?;
        let drops = Array::try_from(take(&mut ebpf, "rm_drops")?)
            .map_err(|e| err("rm_drops")(e.to_string()))?;
        Ok(Self {
            backend,
            _ebpf: ebpf,
            events,
            stop,
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
        let first = self
            .events
            .recv()
            .await
            .ok_or_else(|| err("ring buffer")("the reader thread stopped".into()))?;
        out.extend(first);
        while let Ok(more) = self.events.try_recv() {
            out.extend(more);
        }
        Ok(())
    }
}

/// `(map id, key, value)` of an expected write.
type EchoKey = (u32, Vec<u8>, Option<Vec<u8>>);

/// Recognises the applier's own writes in the event stream of a backend that reports them
/// (fexit sees every write): each registered `(map, key, value)` consumes exactly one matching
/// event. A change someone else makes at the same moment is not consumed unless it is the very
/// same write, in which case the map holds that value either way.
#[derive(Debug, Default)]
pub struct EchoFilter {
    expected: foldhash::HashMap<EchoKey, u32>,
}

impl EchoFilter {
    /// Records a write about to be made.
    pub fn register(&mut self, map_id: u32, key: &[u8], value: Option<&[u8]>) {
        *self
            .expected
            .entry((map_id, key.to_vec(), value.map(<[u8]>::to_vec)))
            .or_default() += 1;
    }

    /// Forgets a registration whose write failed (no event will come).
    pub fn unregister(&mut self, map_id: u32, key: &[u8], value: Option<&[u8]>) {
        let k = (map_id, key.to_vec(), value.map(<[u8]>::to_vec));
        if let Some(n) = self.expected.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.expected.remove(&k);
            }
        }
    }

    /// True (and consumes the registration) when `ev` is one of the registered writes.
    pub fn is_echo(&mut self, ev: &CaptureEvent) -> bool {
        if ev.evicted {
            return false;
        }
        let k = (ev.map_id, ev.key.clone(), ev.value.clone());
        match self.expected.get_mut(&k) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.expected.remove(&k);
                }
                true
            }
            None => false,
        }
    }

    /// Forgets every registration (after events were lost, some will never be matched).
    pub fn clear(&mut self) {
        self.expected.clear();
    }

    /// Registrations not yet matched.
    pub fn outstanding(&self) -> usize {
        self.expected.values().map(|n| *n as usize).sum()
    }
}
