//! Exercises the fexit capture backend against the running kernel and prints one line per check
//! and a closing `fexit-check: N passed, N failed` line. Runs as root on a kernel that allows
//! tracing programs; the test suite boots it in a QEMU guest with Debian's stock kernel
//! (`ebpf-hooks/tests/fexit_vm.rs`), since the development kernel refuses fexit.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use raftmap_ebpf_hooks::{
    Capture, CaptureEvent, Conntrack, EchoFilter, KernelMap, MapKind, UpdateFlags,
};

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            println!("ok   {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {detail}");
        }
    }
}

/// Collects events until one for `marker_key` on `marker_map` arrives (or 20 s pass).
async fn until_marker(cap: &mut Capture, marker_map: u32, marker_key: &[u8]) -> Vec<CaptureEvent> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events
        .iter()
        .any(|e: &CaptureEvent| e.map_id == marker_map && e.key == marker_key && !e.evicted)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, cap.next_events(&mut events)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    events
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut c = Checks {
        passed: 0,
        failed: 0,
    };
    let run = run(&mut c).await;
    if let Err(e) = run {
        c.check("setup", false, e);
    }
    println!("fexit-check: {} passed, {} failed", c.passed, c.failed);
    std::process::exit(i32::from(c.failed > 0));
}

async fn run(c: &mut Checks) -> Result<(), String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}", kernel.trim());
    let mut cap = Capture::fexit().map_err(|e| format!("the fexit backend does not load: {e}"))?;
    c.check("fexit backend loads and attaches", true, "");

    let hash =
        KernelMap::create(MapKind::Hash, 4, 8, 64, "rm_f_hash").map_err(|e| e.to_string())?;
    let lru =
        KernelMap::create(MapKind::LruHash, 4, 4, 16, "rm_f_lru").map_err(|e| e.to_string())?;
    let marker =
        KernelMap::create(MapKind::Hash, 4, 4, 4, "rm_f_mark").map_err(|e| e.to_string())?;
    let array =
        KernelMap::create(MapKind::Array, 4, 8, 4, "rm_f_array").map_err(|e| e.to_string())?;
    let pin = PathBuf::from("/sys/fs/bpf/rm_f_ct");
    let _ = std::fs::remove_file(&pin);
    let mut prog = Conntrack::load(&pin).map_err(|e| e.to_string())?;
    let ct = KernelMap::open_pinned(&pin).map_err(|e| e.to_string())?;
    let (h, l, m, t) = (
        hash.layout().id,
        lru.layout().id,
        marker.layout().id,
        ct.layout().id,
    );
    let arr = array.layout().id;
    for id in [h, l, m, t, arr] {
        cap.watch(id).map_err(|e| e.to_string())?;
    }
    let err = |e: raftmap_ebpf_hooks::HookError| e.to_string();

    // Syscalls: an update, a failing update, a delete, a delete of a missing key.
    hash.update(&[1; 4], &[2; 8], UpdateFlags::Any)
        .map_err(err)?;
    let failed = hash.update(&[1; 4], &[3; 8], UpdateFlags::NoExist).is_err();
    hash.delete(&[1; 4]).map_err(err)?;
    let missing = hash.delete(&[9; 4]).map_err(err)?;
    // A BPF program's write (the conntrack program inserting a flow).
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    prog.run(&Conntrack::frame(a, b, 1000, 80, true))
        .map_err(err)?;
    // ... and its delete (the program removes a flow on FIN).
    prog.run(&Conntrack::frame(a, b, 1001, 80, true))
        .map_err(err)?;
    prog.run(&Conntrack::fin_frame(a, b, 1001, 80))
        .map_err(err)?;
    // An array element update.
    array
        .update(&2u32.to_ne_bytes(), &[4; 8], UpdateFlags::Any)
        .map_err(err)?;
    // LRU evictions: far more keys than the map holds.
    for i in 0..200u32 {
        lru.update(&i.to_ne_bytes(), &i.to_ne_bytes(), UpdateFlags::Any)
            .map_err(err)?;
    }
    marker
        .update(&[0; 4], &[0; 4], UpdateFlags::Any)
        .map_err(err)?;
    let events = until_marker(&mut cap, m, &[0; 4]).await;

    let of = |id: u32| events.iter().filter(move |e| e.map_id == id && !e.evicted);
    let hash_events: Vec<_> = of(h).map(|e| (e.key.clone(), e.value.clone())).collect();
    c.check(
        "a failing update is refused by the kernel",
        failed && !missing,
        "setup",
    );
    c.check(
        "syscall update and delete reported, failed ones not",
        hash_events == vec![(vec![1; 4], Some(vec![2; 8])), (vec![1; 4], None)],
        format!("{hash_events:?}"),
    );
    let flow = Conntrack::key(a, b, 1000, 80, true);
    c.check(
        "a BPF program's update reported with its key and value",
        of(t).any(|e| e.key == flow && e.value.as_ref().is_some_and(|v| v.len() == 16)),
        format!("{:?}", of(t).collect::<Vec<_>>()),
    );
    c.check(
        "array updates reported",
        of(arr)
            .map(|e| (e.key.clone(), e.value.clone()))
            .eq([(2u32.to_ne_bytes().to_vec(), Some(vec![4; 8]))]),
        format!("{:?}", of(arr).collect::<Vec<_>>()),
    );
    let closed = Conntrack::key(a, b, 1001, 80, true);
    c.check(
        "a BPF program's delete reported",
        of(t).any(|e| e.key == closed && e.value.is_none()),
        format!("{:?}", of(t).collect::<Vec<_>>()),
    );
    let evicted: HashSet<Vec<u8>> = events
        .iter()
        .filter(|e| e.map_id == l && e.evicted)
        .map(|e| e.key.clone())
        .collect();
    let present: HashSet<Vec<u8>> = lru.entries().map_err(err)?.into_keys().collect();
    c.check(
        "LRU evictions reported, and only of keys no longer in the map",
        !evicted.is_empty() && evicted.is_disjoint(&present),
        format!("{} evicted, {} present", evicted.len(), present.len()),
    );
    c.check(
        "every LRU insert reported",
        of(l).count() == 200,
        format!("{} update events", of(l).count()),
    );

    // Echo suppression while a BPF program writes the same map at the same time: the applier's
    // registered writes are recognised; none of the program's writes is mistaken for one.
    let mut filter = EchoFilter::default();
    let applier_keys: Vec<Vec<u8>> = (0..300u16)
        .map(|i| Conntrack::key([192, 168, 0, 1], [192, 168, 0, 2], i, 443, true))
        .collect();
    for k in &applier_keys {
        filter.register(t, k, Some(&[7; 16]));
    }
    let ct_pin = pin.clone();
    let applier = std::thread::spawn(move || -> Result<(), String> {
        let map = KernelMap::open_pinned(&ct_pin).map_err(|e| e.to_string())?;
        for k in &applier_keys {
            map.update(k, &[7; 16], UpdateFlags::Any)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let program_flows: Vec<_> = (0..300u16).map(|i| (a, b, 2000 + i, 53, false)).collect();
    for &(s, d, sp, dp, tcp) in &program_flows {
        prog.run(&Conntrack::frame(s, d, sp, dp, tcp))
            .map_err(err)?;
    }
    applier
        .join()
        .map_err(|_| "applier thread panicked".to_string())??;
    marker
        .update(&[1; 4], &[1; 4], UpdateFlags::Any)
        .map_err(err)?;
    let events = until_marker(&mut cap, m, &[1; 4]).await;
    let mut foreign = HashSet::new();
    let mut echoes = 0;
    for e in events.iter().filter(|e| e.map_id == t && !e.evicted) {
        if filter.is_echo(e) {
            echoes += 1;
        } else {
            foreign.insert(e.key.clone());
        }
    }
    let expected: HashSet<Vec<u8>> = program_flows
        .iter()
        .map(|&(s, d, sp, dp, tcp)| Conntrack::key(s, d, sp, dp, tcp))
        .collect();
    c.check(
        "every applier write recognised as an echo",
        echoes == 300 && filter.outstanding() == 0,
        format!(
            "{echoes} echoes, {} registrations left",
            filter.outstanding()
        ),
    );
    c.check(
        "every concurrent program write kept as a real change",
        foreign == expected,
        format!(
            "{} of {} program writes kept",
            foreign.intersection(&expected).count(),
            expected.len()
        ),
    );
    // Lone changes, each made after the reader has gone back to sleep (the gap lets it): each
    // must wake it rather than wait for its poll to time out (100 ms).
    let mut waited = Duration::ZERO;
    for i in 0..20u8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        hash.update(&[i; 4], &[i; 8], UpdateFlags::Any)
            .map_err(err)?;
        let written = Instant::now();
        until_marker(&mut cap, h, &[i; 4]).await;
        waited += written.elapsed();
    }
    c.check(
        "a lone change wakes the idle reader",
        waited < Duration::from_millis(1000),
        format!("twenty lone changes took {waited:?} to arrive"),
    );
    let (lost, undecoded) = cap.drops().map_err(err)?;
    c.check(
        "no events lost",
        lost == 0 && undecoded == 0,
        format!("lost {lost}, undecoded {undecoded}"),
    );
    let _ = std::fs::remove_file(&pin);
    Ok(())
}
