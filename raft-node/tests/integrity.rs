//! Nothing lost, nothing crashes: hostile peers, greedy clients, full and corrupt disks, large
//! entries. Real `raftmap agent` processes on loopback; each test states the input, then the
//! clear refusal and that nothing changed or was lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openraft::impls::leader_id_adv::LeaderId;
mod common;

use raftmap_jepsen::cluster::{http_get, ClusterOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::put;
use raftmap_node::storage::{Entry, LogId, MapSchema, SnapshotMeta, StoredMembership, Vote};

const T: Duration = Duration::from_secs(60);

fn opts(extra: &[&str]) -> ClusterOptions {
    let mut o = ClusterOptions::new(env!("CARGO_BIN_EXE_raftmap"));
    o.launch.agent_args = extra.iter().map(|s| s.to_string()).collect();
    o
}

/// A 3-node cluster with `extra` agent arguments and map "m" holding `entries` keys, applied
/// everywhere.
async fn three_nodes_with_data(
    extra: &[&str],
    entries: u64,
) -> (LocalCluster, raftmap_node::Client) {
    let mut c = LocalCluster::start(opts(extra), 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("m", 8, 8, 10_000))
        .await
        .unwrap();
    for i in 0..entries {
        client.put("m", key(i), key(i)).await.unwrap();
    }
    c.wait_applied(&[1, 2, 3], client.status().await.unwrap().applied_index, T)
        .await
        .unwrap();
    (c, client)
}

fn key(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

/// What every node shows of itself and of the data: must not move under hostile input.
async fn fingerprint(c: &LocalCluster, map: &str) -> Vec<(u64, u64, u64, Vec<(Vec<u8>, Vec<u8>)>)> {
    let mut out = Vec::new();
    for id in c.ids() {
        let client = c.client(id).await.unwrap();
        let s = client.status().await.unwrap();
        let dump = client.dump(map, false).await.unwrap().2;
        out.push((s.term, s.leader_id, s.last_log_index, dump));
    }
    out
}

/// The peak resident memory of a node's process (kB).
fn peak_rss_kb(c: &LocalCluster, id: u64) -> u64 {
    let pid = c.node(id).unwrap().pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The header of an InstallSnapshot stream, as raftmap's peers encode it.
#[derive(serde::Serialize)]
struct SnapshotHeader {
    vote: Vote,
    meta: SnapshotMeta,
}

fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(
        LeaderId {
            term,
            node_id: node,
        },
        index,
    )
}

/// Sends a snapshot stream: the header, then `chunks` messages of `chunk` bytes, `pause` apart.
async fn send_snapshot(
    client: &mut common::Peer,
    header: &SnapshotHeader,
    chunks: usize,
    chunk: usize,
    pause: Duration,
) -> Result<pb::RaftPayload, tonic::Status> {
    let first = pb::RaftPayload {
        data: postcard::to_stdvec(header).unwrap(),
    };
    let parts = futures_util::stream::unfold(0usize, move |i| async move {
        if i > chunks {
            return None;
        }
        if i == 0 {
            return Some((pb::RaftPayload { data: Vec::new() }, 1));
        }
        tokio::time::sleep(pause).await;
        Some((
            pb::RaftPayload {
                data: vec![7u8; chunk],
            },
            i + 1,
        ))
    });
    use futures_util::StreamExt;
    let stream = futures_util::stream::once(async move { first }).chain(parts.skip(1));
    client
        .install_snapshot(stream)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_peer_messages_are_refused_and_change_nothing() {
    let (mut c, _) = three_nodes_with_data(&["--max-snapshot-bytes", "67108864"], 10).await;
    let before = fingerprint(&c, "m").await;
    let term = before[0].0;
    let leader = before[0].1;
    let target = [1, 2, 3].into_iter().find(|&n| n != leader).unwrap();
    // What a member could send if it were broken or compromised: its certificate is valid,
    // the messages are not.
    let mut p = common::peer_as(&c, target, leader).await;
    let rss_before = peak_rss_kb(&c, target);

    // An InstallSnapshot header with vote term T+1 and last log id term T+5: openraft would
    // stop on an assertion.
    let forged = SnapshotHeader {
        vote: Vote::new_committed(term + 1, leader),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(term + 5, leader, 1_000_000)),
            last_membership: StoredMembership::default(),
        },
    };
    let e = send_snapshot(&mut p, &forged, 1, 1024, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("newer than the sender's vote"), "{e}");

    // The same shape of header naming "node 99" with a consistent vote: not the sender.
    let stranger = SnapshotHeader {
        vote: Vote::new_committed(term + 1, 99),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(term + 1, 99, 1_000_000)),
            last_membership: StoredMembership::default(),
        },
    };
    let e = send_snapshot(&mut p, &stranger, 1, 1024, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        e.message().contains(&format!(
            "claims to come from node 99, the call is node {leader}'s"
        )),
        "{e}"
    );

    // An AppendEntries with a higher vote and one put, from the same stranger.
    let append = openraft::raft::AppendEntriesRequest::<raftmap_node::storage::TypeConfig> {
        vote: Vote::new_committed(term + 1, 99),
        prev_log_id: None,
        entries: vec![Entry {
            log_id: log_id(term + 1, 99, 0),
            payload: openraft::EntryPayload::Normal(raftmap_node::storage::Proposal {
                batches: vec![raftmap_node::storage::ClientBatch {
                    origin: 99,
                    seq: 1,
                    source: raftmap_node::storage::Source::Api,
                    ops: vec![raftmap_node::storage::Op::Put {
                        map: "m".into(),
                        key: key(1),
                        value: key(666),
                    }],
                }],
                admin: vec![],
            }),
        }],
        leader_commit: Some(log_id(term + 1, 99, 0)),
    };
    let msg = pb::RaftPayload {
        data: postcard::to_stdvec(&append).unwrap(),
    };
    let answers = p
        .append_entries(futures_util::stream::iter([msg]))
        .await
        .unwrap()
        .into_inner();
    use futures_util::StreamExt;
    let answered: Vec<_> =
        tokio::time::timeout(Duration::from_secs(10), answers.collect::<Vec<_>>())
            .await
            .unwrap();
    assert!(
        answered.iter().all(Result::is_err) || answered.is_empty(),
        "the forged append was answered: {answered:?}"
    );

    // A snapshot stream that never ends (a member's vote, data past the cap of 64 MiB), and
    // one that stalls: both cut off.
    let member = SnapshotHeader {
        vote: Vote::new_committed(term, leader),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(term, leader, 1_000_000)),
            last_membership: StoredMembership::default(),
        },
    };
    let e = send_snapshot(&mut p, &member, 40, 4 << 20, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("larger than this node accepts"), "{e}");
    let started = Instant::now();
    let e = send_snapshot(&mut p, &member, 2, 1024, Duration::from_secs(15))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
    assert!(started.elapsed() < Duration::from_secs(14));

    // Nothing moved: term, leader, log and every node's data; memory stayed bounded.
    assert_eq!(fingerprint(&c, "m").await, before);
    let grown_mb = (peak_rss_kb(&c, target) - rss_before) / 1024;
    assert!(grown_mb < 64, "node {target} grew by {grown_mb} MiB");
    let refused = c
        .counter(target, "raftmap_refused_peer_messages_total")
        .unwrap();
    assert!(refused >= 4.0, "{refused}");
    // Not one spooled snapshot left in the data dir.
    let dir = c.node(target).unwrap().data_dir.clone();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("snapshot-incoming"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    c.check_alive("after the forged messages").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_past_the_cap_are_refused_and_gone_ones_free_their_place() {
    let c = LocalCluster::start(opts(&["--max-watchers", "4"]), 1, 0, T)
        .await
        .unwrap();
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("m", 8, 8, 1000))
        .await
        .unwrap();
    let watch = || async {
        client
            .kv()
            .watch(pb::WatchRequest {
                map: "m".into(),
                after_index: 0,
            })
            .await
    };
    // Four watchers that never read.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(watch().await.unwrap().into_inner());
    }
    let e = watch().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("most watch streams (4)"), "{e}");
    // Writes go on meanwhile.
    for i in 0..200 {
        client.put("m", key(i), key(i)).await.unwrap();
    }
    // Two clients go away: their places come free.
    held.truncate(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    while again.len() < 2 {
        match watch().await {
            Ok(s) => again.push(s.into_inner()),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                assert!(
                    Instant::now() < deadline,
                    "the places of gone watchers were not freed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // A new watcher gets every entry.
    let mut s = again.pop().unwrap();
    let mut seen = 0;
    while seen < 200 {
        let ev = s.message().await.unwrap().unwrap();
        assert!(ev.event.is_some());
        seen += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_compare_and_swap_answers_within_its_budget_and_writes_nothing() {
    let c = LocalCluster::start(opts(&[]), 1, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("big", 8, 64 * 1024, 1000))
        .await
        .unwrap();
    // 400 keys of 64 KiB, in batches the size limit takes.
    for chunk in (0..400u64).collect::<Vec<_>>().chunks(100) {
        let ops = chunk
            .iter()
            .map(|&i| put("big", key(i), vec![i as u8; 64 * 1024]))
            .collect();
        client.write(ops).await.unwrap();
    }
    let before = client.dump("big", true).await.unwrap().2;
    // Every CAS expects the key absent: every one fails, each with a 64 KiB actual value.
    let ops = (0..400u64)
        .map(|i| {
            pb::op::Op::Cas(pb::CompareAndSwap {
                map: "big".into(),
                key: key(i),
                expected: None,
                new_value: Some(vec![0; 64 * 1024]),
            })
        })
        .take(100)
        .collect();
    let r = client.write(ops).await.unwrap();
    assert!(!r.succeeded);
    let listed: usize = r
        .mismatches
        .iter()
        .map(|m| m.actual.as_ref().map_or(0, Vec::len))
        .sum();
    assert!(
        listed <= 1024 * 1024,
        "{listed} bytes of values in the answer"
    );
    assert_eq!(r.mismatches.len() + r.mismatches_omitted as usize, 100);
    assert!(r.mismatches_omitted > 0);
    assert_eq!(
        client.dump("big", true).await.unwrap().2,
        before,
        "a failed CAS wrote"
    );
}

/// A tmpfs mounted for one test, unmounted when dropped (whatever happened).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mb: u64) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {} (needs root)", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_the_others_go_on_and_nothing_acknowledged_is_lost() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        assert!(
            std::env::var_os("RAFTMAP_REQUIRE_BPF").is_none(),
            "this test mounts a tmpfs: run it as root"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut c = LocalCluster::new(opts(&[])).unwrap();
    // Node 3's data dir on a small tmpfs.
    let fs = Tmpfs::mount(&c.dir().join("node-3"), 256);
    c.spawn(1, None, false).unwrap();
    c.wait_up(1, T).await.unwrap();
    c.client(1)
        .await
        .unwrap()
        .admin()
        .init(pb::InitRequest {})
        .await
        .unwrap();
    c.spawn(2, Some(1), false).unwrap();
    c.spawn(3, Some(1), false).unwrap();
    for id in [1, 2, 3] {
        c.wait_ready(id, T).await.unwrap();
    }
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("m", 8, 32 * 1024, 100_000))
        .await
        .unwrap();
    // Leave node 3 about 24 MiB above the free space it keeps in reserve.
    let avail = nix::sys::statvfs::statvfs(&fs.0).unwrap();
    let free = avail.blocks_available() * avail.fragment_size();
    let filler = fs.0.join("filler");
    let keep = raftmap_storage::DEFAULT_MIN_FREE_BYTES + (24 << 20);
    std::fs::write(&filler, vec![0u8; (free - keep) as usize]).unwrap();
    // Write until node 3 has stopped, and some more.
    let mut acked = BTreeMap::new();
    let deadline = Instant::now() + T;
    let mut after_stop = 0;
    let mut i = 0u64;
    while after_stop < 10 {
        assert!(
            Instant::now() < deadline,
            "node 3 never stopped on its full disk"
        );
        let ops = (0..64)
            .map(|j| put("m", key(i * 64 + j), vec![(i % 251) as u8; 32 * 1024]))
            .collect();
        client.write(ops).await.unwrap();
        for j in 0..64 {
            acked.insert(i * 64 + j, (i % 251) as u8);
        }
        i += 1;
        if !c.node_mut(3).unwrap().is_running() {
            after_stop += 1;
        }
    }
    let log = std::fs::read_to_string(&c.node(3).unwrap().log_path).unwrap();
    let status = c.node_mut(3).unwrap().exit_status().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "node 3 did not exit cleanly:\n{log}"
    );
    assert!(
        log.contains("error:") && log.contains("bytes free, under the"),
        "the daemon did not say why it stopped:\n{log}"
    );
    // Space is freed; node 3 comes back and has every acknowledged write.
    std::fs::remove_file(&filler).unwrap();
    c.kill(3).unwrap();
    c.restart(3).unwrap();
    let target = client.status().await.unwrap().applied_index;
    c.wait_applied(&[3], target, T).await.unwrap();
    let three = c.client(3).await.unwrap().dump("m", false).await.unwrap().2;
    assert_eq!(three.len(), acked.len());
    for (k, v) in three {
        let i = u64::from_be_bytes(k.try_into().unwrap());
        assert_eq!(v[0], acked[&i], "key {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_entries_of_megabytes_catches_up() {
    let mut c = LocalCluster::start(opts(&[]), 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("big", 8, 64 * 1024, 10_000))
        .await
        .unwrap();
    c.kill(3).unwrap();
    // 24 entries of 7.5 MiB each: a 64-entry append of them would be 480 MiB.
    for b in 0..24u64 {
        let ops = (0..120)
            .map(|j| put("big", key(b * 120 + j), vec![b as u8; 64 * 1024]))
            .collect();
        client.write(ops).await.unwrap();
    }
    c.restart(3).unwrap();
    let target = client.status().await.unwrap().applied_index;
    c.wait_applied(&[3], target, T).await.unwrap();
    let three = c
        .client(3)
        .await
        .unwrap()
        .dump("big", false)
        .await
        .unwrap()
        .2;
    assert_eq!(three.len(), 24 * 120);
    for id in [1, 3] {
        let log = std::fs::read_to_string(&c.node(id).unwrap().log_path).unwrap();
        assert!(
            !log.contains("message length too large") && !log.contains("larger than max"),
            "node {id} hit a message size limit:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_disk_and_a_diverged_replica_are_found_and_named() {
    let checks = ["--disk-check-ms", "300", "--consistency-check-ms", "300"];
    let (mut c, _) = three_nodes_with_data(&checks, 50).await;
    let leader = c.leader(&[1, 2, 3]).await.unwrap();
    let victim = [1, 2, 3].into_iter().find(|&n| n != leader).unwrap();
    // Behind the node's back: one value flipped, and the digest it keeps changed.
    c.kill(victim).unwrap();
    {
        let names = ["default", "log", "meta", "sm_meta", "sm_data"];
        let path = c.node(victim).unwrap().data_dir.join("db");
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), path, names).unwrap();
        let data = db.cf_handle("sm_data").unwrap();
        let (k, mut v) = db
            .iterator_cf(data, rocksdb::IteratorMode::Start)
            .next()
            .unwrap()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .unwrap();
        v[7] ^= 1;
        db.put_cf(data, k, v).unwrap();
        let meta = db.cf_handle("sm_meta").unwrap();
        db.put_cf(meta, b"digest", 12345u64.to_be_bytes()).unwrap();
    }
    c.restart(victim).unwrap();
    // The node finds its own disk corrupt and stops reporting ready.
    c.wait_for(victim, T, "find its disk corrupt", |s| {
        s.corrupt.contains(&format!("node {victim}")) && !s.ready
    })
    .await
    .unwrap();
    let addr = c.node(victim).unwrap().metrics_addr.clone();
    let (code, body) = http_get(&addr, "/readyz").unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("corrupt"), "{body}");
    assert_eq!(c.counter(victim, "raftmap_corrupt").unwrap(), 1.0);
    // Past the next checkpoint the leader sees its digest differ from the others', and names it.
    let cl = c.client(leader).await.unwrap();
    let mut i = 100;
    let deadline = Instant::now() + T;
    loop {
        let st = cl.status().await.unwrap();
        if st.corrupt.contains("replicas disagree") {
            assert!(
                st.corrupt.contains(&format!("[{victim}]")),
                "{}",
                st.corrupt
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader did not notice: {st:?}"
        );
        let ops: Vec<_> = (0..20).map(|j| put("m", key(i + j), key(i))).collect();
        // One entry per write: checkpoints every 1000 entries.
        for op in ops {
            cl.write(vec![op]).await.unwrap();
        }
        i += 20;
    }
    assert_eq!(c.counter(leader, "raftmap_corrupt").unwrap(), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_is_dropped_only_when_no_node_watches_it() {
    // Node 1 watches "watched" (at a pin that does not exist: it still counts as watching).
    let mut o = opts(&[]);
    o.launch.node_args.insert(
        1,
        vec![
            "--watch".into(),
            "watched=/sys/fs/bpf/raftmap-it-no-such-pin".into(),
        ],
    );
    // The node is never ready (its watched map is missing): started by hand.
    let mut c = LocalCluster::new(o).unwrap();
    c.spawn(1, None, false).unwrap();
    c.wait_up(1, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client.admin().init(pb::InitRequest {}).await.unwrap();
    c.wait_for(1, T, "lead", |s| s.role == "leader")
        .await
        .unwrap();
    for m in ["watched", "free"] {
        client
            .declare(&MapSchema::hash(m, 8, 8, 100))
            .await
            .unwrap();
        client.put(m, key(1), key(1)).await.unwrap();
    }
    let mut watcher = client
        .kv()
        .watch(pb::WatchRequest {
            map: "free".into(),
            after_index: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watcher.message().await.unwrap().is_some());
    let drop_map = |map: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_raftmap"))
            .args([
                "map",
                "drop",
                map,
                "--endpoints",
                &c.node(1).unwrap().api_addr,
            ])
            .env("RAFTMAP_TLS_DIR", c.security().dir().unwrap())
            .output()
            .unwrap()
    };
    let out = drop_map("watched");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 1 watches map watched"), "{err}");
    assert!(client.get("watched", key(1), true).await.unwrap().is_some());
    let out = drop_map("free");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = client.get("free", key(1), true).await.unwrap_err();
    assert!(e.to_string().contains("unknown map \"free\""), "{e}");
    // Its watchers are told.
    let e = watcher.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let out = drop_map("free");
    assert!(!out.status.success(), "dropping a map twice");
    // Declared again, with another schema.
    client
        .declare(&MapSchema::hash("free", 4, 4, 10))
        .await
        .unwrap();
    assert!(client.dump("free", true).await.unwrap().2.is_empty());
}
