//! Real kernel maps: needs root (or CAP_BPF) and bpffs. Under RAFTMAP_REQUIRE_BPF=1 (CI) a
//! missing capability fails the test instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use raftmap_ebpf_hooks::{bpf_or_skip, HookError, KernelMap, MapKind, UpdateFlags};

/// A bpffs path removed when dropped.
struct Pin(PathBuf);
impl Pin {
    fn new(tag: &str) -> Self {
        let p =
            raftmap_ebpf_hooks::bpffs().join(format!("raftmap-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Pin(p)
    }
}
impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn read_write_iterate_with_run_time_sizes() {
    if !bpf_or_skip("read_write_iterate_with_run_time_sizes") {
        return;
    }
    let map = KernelMap::create(MapKind::Hash, 13, 24, 64, "rm_t_rw").unwrap();
    let l = map.layout().clone();
    assert_eq!(
        (l.kind, l.key_size, l.value_size, l.max_entries),
        (MapKind::Hash, 13, 24, 64)
    );
    let key = |i: u8| vec![i; 13];
    let val = |i: u8| vec![i.wrapping_mul(3); 24];
    for i in 0..10 {
        map.update(&key(i), &val(i), UpdateFlags::Any).unwrap();
    }
    assert_eq!(map.lookup(&key(3)).unwrap(), Some(val(3)));
    assert_eq!(map.lookup(&key(99)).unwrap(), None);
    assert!(map.delete(&key(3)).unwrap());
    assert!(!map.delete(&key(3)).unwrap());
    let all = map.entries().unwrap();
    assert_eq!(all.len(), 9);
    assert_eq!(all.get(&key(7)), Some(&val(7)));
    assert!(!all.contains_key(&key(3)));

    // The kernel's own checks come back as errors naming the call and the map.
    let e = map
        .update(&key(1), &val(1), UpdateFlags::NoExist)
        .unwrap_err();
    assert!(
        matches!(&e, HookError::Syscall { call: "BPF_MAP_UPDATE_ELEM", source, .. } if source.raw_os_error() == Some(EEXIST)),
        "{e}"
    );
    let e = map.update(&key(1), &[0; 3], UpdateFlags::Any).unwrap_err();
    assert_eq!(
        e.to_string(),
        "map rm_t_rw: value is 3 bytes, the map's value size is 24"
    );
}

/// errno for "exists", returned for BPF_NOEXIST on a present key.
const EEXIST: i32 = 17;

#[test]
fn full_hash_map_refuses_lru_map_evicts() {
    if !bpf_or_skip("full_hash_map_refuses_lru_map_evicts") {
        return;
    }
    let hash = KernelMap::create(MapKind::Hash, 4, 4, 2, "rm_t_full").unwrap();
    hash.update(&[1; 4], &[1; 4], UpdateFlags::Any).unwrap();
    hash.update(&[2; 4], &[2; 4], UpdateFlags::Any).unwrap();
    assert!(hash.update(&[3; 4], &[3; 4], UpdateFlags::Any).is_err());
    let lru = KernelMap::create(MapKind::LruHash, 4, 4, 64, "rm_t_lru").unwrap();
    for i in 0..200u32 {
        lru.update(&i.to_ne_bytes(), &i.to_ne_bytes(), UpdateFlags::Any)
            .unwrap();
    }
    let n = lru.entries().unwrap().len();
    assert!(n > 0 && n <= 64, "LRU map holds {n} entries, max 64");
}

#[test]
fn open_by_pin_and_by_name_refuses_ambiguity() {
    if !bpf_or_skip("open_by_pin_and_by_name_refuses_ambiguity") {
        return;
    }
    let pin = Pin::new("pin");
    let name = format!("rm_n{}", std::process::id() % 100_000);
    let map = KernelMap::create(MapKind::LruHash, 8, 8, 16, &name).unwrap();
    map.pin(&pin.0).unwrap();
    map.update(&[1; 8], &[2; 8], UpdateFlags::Any).unwrap();

    let by_pin = KernelMap::open_pinned(&pin.0).unwrap();
    assert_eq!(by_pin.layout(), map.layout());
    assert_eq!(by_pin.lookup(&[1; 8]).unwrap(), Some(vec![2; 8]));
    let by_name = KernelMap::open_by_name(&name).unwrap();
    assert_eq!(by_name.layout().id, map.layout().id);

    let twin = KernelMap::create(MapKind::LruHash, 8, 8, 16, &name).unwrap();
    let e = KernelMap::open_by_name(&name).unwrap_err();
    assert!(matches!(e, HookError::Ambiguous { count: 2, .. }), "{e}");
    drop(twin);
    let e = KernelMap::open_by_name("rm_no_such_map").unwrap_err();
    assert!(matches!(e, HookError::NotFound(_)), "{e}");
    let e = KernelMap::open_pinned(&pin.0.with_file_name("raftmap-test-missing")).unwrap_err();
    assert!(e.to_string().contains("raftmap-test-missing"), "{e}");
}

#[test]
fn conntrack_program_records_flows_in_its_map() {
    if !bpf_or_skip("conntrack_program_records_flows_in_its_map") {
        return;
    }
    use raftmap_ebpf_hooks::Conntrack;
    let pin = Pin::new("ct");
    let mut prog = Conntrack::load(&pin.0).unwrap();
    let map = KernelMap::open_pinned(&pin.0).unwrap();
    assert_eq!(map.layout().kind, MapKind::LruHash);
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    for _ in 0..3 {
        assert_eq!(
            prog.run(&Conntrack::frame(a, b, 40000, 443, true)).unwrap(),
            2,
            "XDP_PASS"
        );
    }
    prog.run(&Conntrack::frame(b, a, 53, 40001, false)).unwrap();
    let all = map.entries().unwrap();
    assert_eq!(all.len(), 2);
    let v = &all[&Conntrack::key(a, b, 40000, 443, true)];
    assert_eq!(
        u64::from_ne_bytes(v[..8].try_into().unwrap()),
        3,
        "packets counted in place"
    );
    assert!(all.contains_key(&Conntrack::key(b, a, 53, 40001, false)));
    prog.run(&Conntrack::fin_frame(a, b, 40000, 443)).unwrap();
    let all = map.entries().unwrap();
    assert_eq!(all.len(), 1, "a FIN removes the flow");
}

fn bpftool(args: &[&str]) -> bool {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool is installed (scripts/install-deps.sh)");
    out.status.success()
}

fn hex_args(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bpftool_update(pin: &std::path::Path, key: &[u8], value: &[u8], extra: &[&str]) -> bool {
    let mut args = vec![
        "map".to_string(),
        "update".into(),
        "pinned".into(),
        pin.display().to_string(),
        "key".into(),
        "hex".into(),
    ];
    args.extend(hex_args(key));
    args.extend(["value".to_string(), "hex".into()]);
    args.extend(hex_args(value));
    args.extend(extra.iter().map(|s| s.to_string()));
    bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscall_backend_reports_successful_changes_made_by_other_processes() {
    if !bpf_or_skip("syscall_backend_reports_successful_changes_made_by_other_processes") {
        return;
    }
    use raftmap_ebpf_hooks::{Backend, Capture, CaptureEvent};
    let mut cap = Capture::syscall().expect("the syscall backend loads on this kernel");
    assert_eq!(cap.backend(), Backend::Syscall);
    let (pin, other_pin) = (Pin::new("cap"), Pin::new("cap-other"));
    let map = KernelMap::create(MapKind::Hash, 4, 8, 64, "rm_t_cap").unwrap();
    map.pin(&pin.0).unwrap();
    let other = KernelMap::create(MapKind::Hash, 4, 8, 64, "rm_t_cap2").unwrap();
    other.pin(&other_pin.0).unwrap();
    cap.watch(map.layout().id).unwrap();
    let id = map.layout().id;

    assert!(
        bpftool_update(&other_pin.0, &[9; 4], &[9; 8], &[]),
        "unwatched map"
    );
    assert!(bpftool_update(&pin.0, &[1; 4], &[2; 8], &[]));
    assert!(
        !bpftool_update(&pin.0, &[1; 4], &[3; 8], &["noexist"]),
        "a failing update"
    );
    let mut del = vec!["map", "delete", "pinned"];
    let p = pin.0.display().to_string();
    del.push(&p);
    del.extend(["key", "hex", "01", "01", "01", "01"]);
    assert!(bpftool(&del));
    map.update(&[5; 4], &[5; 8], UpdateFlags::Any).unwrap(); // our own process: not reported
    assert!(bpftool_update(&pin.0, &[7; 4], &[7; 8], &[]), "marker");

    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !events.iter().any(|e: &CaptureEvent| e.key == vec![7; 4]) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        tokio::time::timeout(left, cap.next_events(&mut events))
            .await
            .expect("events arrive")
            .unwrap();
    }
    let seen: Vec<_> = events
        .iter()
        .map(|e: &CaptureEvent| (e.map_id, e.key.clone(), e.value.clone(), e.evicted))
        .collect();
    assert_eq!(
        seen,
        vec![
            (id, vec![1; 4], Some(vec![2; 8]), false),
            (id, vec![1; 4], None, false),
            (id, vec![7; 4], Some(vec![7; 8]), false),
        ]
    );
    assert_eq!(cap.drops().unwrap(), (0, 0));
}

/// The capture reader sleeps when the ring is empty and only a record that finds it waiting
/// wakes it; a change made while it sleeps must reach it at once, not when its poll times out
/// (100 ms). Twenty lone changes, each made by another process while the reader is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_change_wakes_the_idle_capture_reader() {
    if !bpf_or_skip("a_lone_change_wakes_the_idle_capture_reader") {
        return;
    }
    use raftmap_ebpf_hooks::{Capture, CaptureEvent};
    use std::time::{Duration, Instant};
    let mut cap = Capture::syscall().expect("the syscall backend loads on this kernel");
    let pin = Pin::new("wake");
    let map = KernelMap::create(MapKind::Hash, 4, 8, 64, "rm_t_wake").unwrap();
    map.pin(&pin.0).unwrap();
    cap.watch(map.layout().id).unwrap();
    let mut waited = Duration::ZERO;
    for i in 0..20u8 {
        assert!(bpftool_update(&pin.0, &[i; 4], &[i; 8], &[]));
        let written = Instant::now();
        let mut events = Vec::new();
        while !events.iter().any(|e: &CaptureEvent| e.key == vec![i; 4]) {
            tokio::time::timeout(Duration::from_secs(10), cap.next_events(&mut events))
                .await
                .expect("the change is reported")
                .unwrap();
        }
        waited += written.elapsed();
    }
    // Woken, the twenty take a few milliseconds in all; left to the poll timeout they would
    // take about a second (half the timeout each, on average).
    assert!(
        waited < Duration::from_millis(500),
        "twenty lone changes took {waited:?} to arrive: the reader was not woken"
    );
}

#[test]
fn large_maps_are_read_whole_in_batches() {
    if !bpf_or_skip("large_maps_are_read_whole_in_batches") {
        return;
    }
    for kind in [MapKind::Hash, MapKind::LruHash] {
        let map = KernelMap::create(kind, 8, 32, 20_000, "rm_t_large").unwrap();
        for i in 0..5000u64 {
            map.update(&i.to_ne_bytes(), &[i as u8; 32], UpdateFlags::Any)
                .unwrap();
        }
        let all = map.entries().unwrap();
        assert_eq!(all.len(), 5000, "{kind}");
        for i in (0..5000u64).step_by(97) {
            assert_eq!(all[&i.to_ne_bytes().to_vec()], vec![i as u8; 32]);
        }
    }
}
