//! End-to-end tests: real `raftmap agent` processes on loopback, real sockets, real SIGKILLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::storage::MapSchema;
use raftmap_node::{put, Client, NodeError};

const T: Duration = Duration::from_secs(60);
const MAP: &str = "ct";

fn opts(extra: &[&str]) -> ClusterOptions {
    ClusterOptions {
        launch: LaunchOptions {
            bin: env!("CARGO_BIN_EXE_raftmap").into(),
            agent_args: extra.iter().map(|s| s.to_string()).collect(),
            log_filter: "info,openraft=warn".into(),
            node_args: Default::default(),
            tls: true,
        },
        netns: false,
    }
}

fn schema() -> MapSchema {
    MapSchema::hash(MAP, 8, 8, 100_000)
}

fn key(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

async fn leader_of(c: &LocalCluster, among: &[u64]) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = c.leader(among).await {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader among {among:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn local_dump(c: &LocalCluster, id: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    c.client(id)
        .await
        .unwrap()
        .dump(MAP, false)
        .await
        .unwrap()
        .2
}

/// Waits until every node in `ids` has applied the leader's commit index, then checks that their
/// local copies of the map are identical. Returns that copy.
async fn converged(c: &mut LocalCluster, ids: &[u64]) -> Vec<(Vec<u8>, Vec<u8>)> {
    // Everything acknowledged so far has been applied on the current leader, so on the node
    // with the highest applied index. (A restarted former leader may briefly call itself
    // leader of its stale term, so "whoever says leader" is not the reference.)
    let mut target = 0;
    for &id in ids {
        target = target.max(
            c.client(id)
                .await
                .unwrap()
                .status()
                .await
                .unwrap()
                .applied_index,
        );
    }
    c.wait_applied(ids, target, T).await.unwrap();
    let reference = local_dump(c, ids[0]).await;
    for &id in &ids[1..] {
        let other = local_dump(c, id).await;
        if other != reference {
            let a: BTreeSet<_> = reference.iter().collect();
            let b: BTreeSet<_> = other.iter().collect();
            panic!(
                "node {id} differs from node {} at index {target}: {} vs {} entries, only on {}: {:?}, only on {id}: {:?}",
                ids[0],
                reference.len(),
                other.len(),
                ids[0],
                a.difference(&b).take(3).collect::<Vec<_>>(),
                b.difference(&a).take(3).collect::<Vec<_>>(),
            );
        }
    }
    reference
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_read_linearizably_everywhere() {
    let mut c = LocalCluster::start(opts(&[]), 3, 1, T).await.unwrap();
    let clients: Vec<Client> = {
        let mut v = Vec::new();
        for id in c.ids() {
            v.push(c.client(id).await.unwrap());
        }
        v
    };
    let leader = leader_of(&c, &[1, 2, 3]).await;
    clients[0].declare(&schema()).await.unwrap();

    // Daemons run without transparent huge pages (a fault on a fresh 2 MiB page stalls the
    // apply path while the page is zeroed).
    for id in c.ids() {
        let pid = c.node(id).unwrap().pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.contains("THP_enabled:\t0"),
            "node {id} has transparent huge pages on"
        );
    }

    // Watch from the learner before writing.
    let mut watch = clients[3]
        .kv()
        .watch(pb::WatchRequest {
            map: MAP.into(),
            after_index: 0,
        })
        .await
        .unwrap()
        .into_inner();

    // Every node (a follower and the learner forward to the leader) accepts writes, and a
    // linearizable read on every node sees each write as soon as it is acknowledged.
    for (i, writer) in clients.iter().enumerate() {
        let status = writer.status().await.unwrap();
        let r = writer
            .put(MAP, key(i as u64), key(100 + i as u64))
            .await
            .unwrap();
        assert!(r.succeeded && r.index > 0);
        // Read your writes: the node that took the write has applied it when it answers, so
        // even its local (no round trip) read sees it.
        assert_eq!(
            writer.get(MAP, key(i as u64), false).await.unwrap(),
            Some(key(100 + i as u64)),
            "write through node {} ({}) not in its own local read",
            status.node_id,
            status.role
        );
        for reader in &clients {
            let got = reader.get(MAP, key(i as u64), true).await.unwrap();
            assert_eq!(
                got,
                Some(key(100 + i as u64)),
                "write through node {} ({}) not visible on {}",
                status.node_id,
                status.role,
                reader.addr()
            );
        }
    }
    assert_ne!(clients[3].status().await.unwrap().role, "leader");
    assert!(leader <= 3);

    // The learner's watch saw the four puts in order.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(T, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::watch_event::Event::Put(p)) = ev.event {
            seen.push(p.key);
        }
    }
    assert_eq!(seen, (0..4u64).map(key).collect::<Vec<_>>());

    // Compare-and-swap: a stale expectation changes nothing and reports the actual value.
    let cas = |expected: u64, new: u64| {
        pb::op::Op::Cas(pb::CompareAndSwap {
            map: MAP.into(),
            key: key(0),
            expected: Some(key(expected)),
            new_value: Some(key(new)),
        })
    };
    let r = clients[2]
        .write(vec![cas(999, 1), put(MAP, key(50), key(50))])
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.mismatches[0].actual, Some(key(100)));
    assert_eq!(
        clients[1].get(MAP, key(50), true).await.unwrap(),
        None,
        "failed CAS batch wrote"
    );
    let r = clients[2].write(vec![cas(100, 7)]).await.unwrap();
    assert!(r.succeeded);
    assert_eq!(
        clients[3].get(MAP, key(0), true).await.unwrap(),
        Some(key(7))
    );

    let all = converged(&mut c, &[1, 2, 3, 4]).await;
    assert_eq!(all.len(), 4);

    // Read your writes through a node that is not the leader, many times over: a follower
    // hears of a commit at about the time the leader's answer to its forwarded write arrives,
    // so a node that answered before applying would be caught out here.
    let follower = clients
        .iter()
        .find(|c| c.addr() != clients[leader as usize - 1].addr())
        .unwrap();
    for n in 0..200u64 {
        follower.put(MAP, key(1000 + n), key(n)).await.unwrap();
        assert_eq!(
            follower.get(MAP, key(1000 + n), false).await.unwrap(),
            Some(key(n)),
            "write {n} through {} not in its own local read",
            follower.addr()
        );
    }

    // Prometheus metrics and probes.
    let leader_metrics = &c.node(leader).unwrap().metrics_addr;
    let (code, body) = http_get(leader_metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("raftmap_is_leader 1"), "{body}");
    let metric = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert!(metric("raftmap_applied_index") >= 6.0);
    assert!(metric("raftmap_commit_latency_seconds_count") >= 1.0);
    assert_eq!(http_get(&c.node(4).unwrap().metrics_addr, "/readyz").0, 200);
    assert_eq!(
        http_get(&c.node(4).unwrap().metrics_addr, "/healthz").0,
        200
    );
}

/// A minimal HTTP/1.0 GET: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_under_load_loses_no_acknowledged_write() {
    let mut c = LocalCluster::start(opts(&[]), 3, 0, T).await.unwrap();
    let old_leader = leader_of(&c, &[1, 2, 3]).await;
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != old_leader).collect();
    c.client(survivors[0])
        .await
        .unwrap()
        .declare(&schema())
        .await
        .unwrap();

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let acked_after_kill = Arc::new(Mutex::new(0u64));
    let mut writers = Vec::new();
    for (w, &id) in survivors.iter().enumerate() {
        let client = c.client(id).await.unwrap();
        let (acked, killed, after) = (acked.clone(), killed.clone(), acked_after_kill.clone());
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut errors = 0u64;
            for i in 0..100_000u64 {
                let k = (w as u64) << 32 | i;
                match client.put(MAP, key(k), key(i)).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(k);
                        if killed.load(Ordering::SeqCst) {
                            let mut a = after.lock().unwrap();
                            *a += 1;
                            if *a >= 300 {
                                break;
                            }
                        }
                    }
                    // During the election a write may fail; it was not acknowledged.
                    Err(_) => errors += 1,
                }
                if Instant::now() > deadline {
                    break;
                }
            }
            errors
        }));
    }
    // Kill the leader once the load is under way.
    let deadline = Instant::now() + T;
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "writes did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.kill(old_leader).unwrap();
    killed.store(true, Ordering::SeqCst);
    let killed_at = Instant::now();
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        *acked_after_kill.lock().unwrap() >= 300,
        "writes did not continue after the leader was killed"
    );
    let new_leader = leader_of(&c, &survivors).await;
    assert_ne!(new_leader, old_leader);
    println!(
        "new leader {new_leader} within {:?} of the kill",
        killed_at.elapsed()
    );

    // Every acknowledged write is there, read linearizably through the new majority.
    let reader = c.client(survivors[1]).await.unwrap();
    let (_, _, entries) = reader.dump(MAP, true).await.unwrap();
    let present: BTreeSet<u64> = entries
        .iter()
        .map(|(k, _)| u64::from_be_bytes(k[..].try_into().unwrap()))
        .collect();
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );

    // The killed node restarts from its data dir and catches up.
    c.restart(old_leader).unwrap();
    c.wait_ready(old_leader, T).await.unwrap();
    let all = converged(&mut c, &[1, 2, 3]).await;
    assert!(all.len() >= acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_learner_catches_up_by_snapshot_then_is_promoted_and_a_voter_removed() {
    let mut c = LocalCluster::start(opts(&["--snapshot-logs", "50"]), 3, 0, T)
        .await
        .unwrap();
    let client = c.client(1).await.unwrap();
    client.declare(&schema()).await.unwrap();
    // One entry per write: enough entries for several snapshots and a purge.
    for i in 0..300u64 {
        client.put(MAP, key(i), key(i * 2)).await.unwrap();
    }
    let leader = leader_of(&c, &[1, 2, 3]).await;
    c.wait_for(leader, T, "purge its log", |s| {
        s.purged_index > 0 && s.snapshot_index > 0
    })
    .await
    .unwrap();

    c.spawn(4, Some(1), true).unwrap();
    c.wait_ready(4, T).await.unwrap();
    let st = c.client(4).await.unwrap().status().await.unwrap();
    assert_eq!(st.role, "learner");
    assert!(
        st.snapshot_index > 0,
        "learner did not receive a snapshot: {st:?}"
    );
    let data = converged(&mut c, &[1, 2, 3, 4]).await;
    assert_eq!(data.len(), 300);

    // Promote the learner, then remove a voter that is not the leader.
    let admin = c.client(2).await.unwrap();
    admin
        .admin()
        .promote(pb::PromoteRequest {
            node_id: 4,
            max_lag: 0,
        })
        .await
        .unwrap();
    let leader = leader_of(&c, &[1, 2, 3, 4]).await;
    let victim = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    let m = admin
        .admin()
        .remove(pb::RemoveRequest {
            node_id: victim,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    let voters: BTreeSet<u64> = m
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect();
    let expected: BTreeSet<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != victim).collect();
    assert_eq!(voters, expected);
    c.kill(victim).unwrap();

    // The new configuration commits writes, and the removed id cannot come back.
    let rest: Vec<u64> = expected.into_iter().collect();
    let newcomer = c.client(4).await.unwrap();
    newcomer.put(MAP, key(1000), key(1)).await.unwrap();
    assert_eq!(converged(&mut c, &rest).await.len(), 301);
    id_cannot_come_back(&newcomer, victim).await;
}

/// Adding a removed node's id again is refused: ids are never reused.
async fn id_cannot_come_back(client: &Client, id: u64) {
    let err = client
        .admin()
        .add_learner(pb::AddLearnerRequest {
            node_id: id,
            raft_addr: "127.0.0.1:1".into(),
            api_addr: "127.0.0.1:2".into(),
            cluster_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    assert!(err.message().contains("cannot be reused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let mut c = LocalCluster::start(opts(&[]), 3, 0, T).await.unwrap();
    let client = c.client(2).await.unwrap();
    client.declare(&schema()).await.unwrap();
    client.put(MAP, key(1), key(1)).await.unwrap();
    let before = converged(&mut c, &[1, 2, 3]).await;

    let invalid = |e: NodeError| match e {
        NodeError::BadRequest(m) => m,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    };
    // Unknown map.
    let m = invalid(client.put("nope", key(1), key(1)).await.unwrap_err());
    assert!(m.contains("unknown map \"nope\""), "{m}");
    // Wrong key and value sizes name the map and both sizes.
    let m = invalid(client.put(MAP, vec![1; 7], key(1)).await.unwrap_err());
    assert_eq!(m, "map ct: key is 7 bytes, the schema says 8");
    let m = invalid(client.put(MAP, key(2), vec![1; 9]).await.unwrap_err());
    assert_eq!(m, "map ct: value is 9 bytes, the schema says 8");
    // A bad op inside an otherwise good batch rejects the whole batch.
    let m = invalid(
        client
            .write(vec![put(MAP, key(3), key(3)), put(MAP, key(4), vec![0; 3])])
            .await
            .unwrap_err(),
    );
    assert!(m.contains("value is 3 bytes"), "{m}");
    // Oversized batch.
    let ops = (0..10_001u64).map(|i| put(MAP, key(i), key(i))).collect();
    let m = invalid(client.write(ops).await.unwrap_err());
    assert!(
        m.contains("batch too large: 10001 operations, the limit is 10000"),
        "{m}"
    );
    // A conflicting re-declaration.
    let mut other = schema();
    other.value_size = 16;
    let m = invalid(client.declare(&other).await.unwrap_err());
    assert!(m.contains("already declared"), "{m}");

    // Init on an initialised cluster.
    let e = client.admin().init(pb::InitRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("already part of a cluster"), "{e}");
    // add-learner reusing a member's id.
    let e = client
        .admin()
        .add_learner(pb::AddLearnerRequest {
            node_id: 3,
            raft_addr: "127.0.0.1:9".into(),
            api_addr: "127.0.0.1:10".into(),
            cluster_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert!(e.message().contains("node id 3 is already a member"), "{e}");
    // Promote of a learner that never caught up (it is not even running).
    let dead = free_addr();
    client
        .admin()
        .add_learner(pb::AddLearnerRequest {
            node_id: 9,
            raft_addr: dead.clone(),
            api_addr: dead,
            cluster_id: String::new(),
        })
        .await
        .unwrap();
    let e = client
        .admin()
        .promote(pb::PromoteRequest {
            node_id: 9,
            max_lag: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("learner 9 has not caught up"), "{e}");
    client
        .admin()
        .remove(pb::RemoveRequest {
            node_id: 9,
            force: false,
        })
        .await
        .unwrap();

    // Unreachable endpoint.
    let e = Client::connect(&[free_addr()], &raftmap_node::tls::Security::insecure())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot reach any endpoint"), "{e}");

    // Nothing above changed the data.
    assert_eq!(converged(&mut c, &[1, 2, 3]).await, before);
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Runs the `raftmap` binary and returns (success, stderr).
fn raftmap(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftmap"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn agent_refuses_foreign_corrupt_and_mismatched_data_dirs() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = dir.to_str().unwrap();
    let (raft, api) = (free_addr(), free_addr());
    let agent = |node: &str| {
        raftmap(&[
            "agent",
            "--node-id",
            node,
            "--raft-addr",
            &raft,
            "--api-addr",
            &api,
            "--data-dir",
            d,
        ])
    };
    // Foreign: a directory with someone else's files.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("important.txt"), "not ours").unwrap();
    let (ok, err) = agent("1");
    assert!(!ok);
    assert!(err.contains("is not a raftmap data dir"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("important.txt")).unwrap(),
        "not ours"
    );
    // Corrupt identity.
    std::fs::remove_file(dir.join("important.txt")).unwrap();
    std::fs::write(dir.join("identity.json"), "{garbage").unwrap();
    let (ok, err) = agent("1");
    assert!(!ok);
    assert!(err.contains("identity.json is corrupt"), "{err}");
    // A valid identity for node 1, started as node 2.
    std::fs::write(dir.join("identity.json"), r#"{"format":1,"node_id":1}"#).unwrap();
    std::fs::create_dir_all(dir.join("db")).unwrap();
    std::fs::write(dir.join("db/CURRENT"), "MANIFEST-000001\n").unwrap();
    let (ok, err) = agent("2");
    assert!(!ok);
    assert!(err.contains("belongs to node 1, not node 2"), "{err}");
    // Node 1 with a corrupt database.
    let (ok, err) = agent("1");
    assert!(!ok);
    assert!(err.contains("rocksdb"), "{err}");
    // One line each.
    assert_eq!(
        err.trim_end()
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{err}"
    );
}

#[test]
fn cli_reports_unreachable_endpoints_and_bad_hex() {
    let addr = free_addr();
    let (ok, err) = raftmap(&["status", "--endpoints", &addr]);
    assert!(!ok);
    assert!(err.contains("no endpoint answered"), "{err}");
    let (ok, err) = raftmap(&["map", "get", "ct", "0011", "--endpoints", &addr]);
    assert!(!ok);
    assert!(err.contains("cannot reach any endpoint"), "{err}");
    let (ok, err) = raftmap(&["map", "put", "ct", "zz", "00", "--endpoints", &addr]);
    assert!(!ok);
    assert!(err.contains("key \"zz\" is not hex"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_is_replaced_and_the_cluster_heals() {
    // Each node in a network namespace of its own; partitions are nftables rules in them.
    let mut o = opts(&[]);
    o.netns = true;
    let mut c = LocalCluster::start(o, 3, 0, T).await.unwrap();
    assert!(c.has_netns());
    let old = leader_of(&c, &[1, 2, 3]).await;
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != old).collect();
    c.client(rest[0])
        .await
        .unwrap()
        .declare(&schema())
        .await
        .unwrap();
    c.partition(&[vec![old], rest.clone()]).unwrap();
    // The majority elects a leader among itself and keeps committing.
    let deadline = Instant::now() + T;
    let new = loop {
        let l = leader_of(&c, &rest).await;
        if l != old {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader behind the partition"
        );
    };
    assert!(rest.contains(&new));
    let majority = c.client(new).await.unwrap();
    majority.put(MAP, key(1), key(1)).await.unwrap();
    // The isolated node cannot serve a linearizable read.
    let isolated = c.client(old).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(15), isolated.get(MAP, key(1), true)).await;
    assert!(
        !matches!(read, Ok(Ok(_))),
        "the isolated old leader answered a linearizable read: {read:?}"
    );
    c.heal().unwrap();
    assert_eq!(converged(&mut c, &[1, 2, 3]).await.len(), 1);
}

/// A leader asked to remove itself answers, the rest of the cluster goes on without it, and
/// its id cannot come back.
async fn a_leader_removes_itself(tls: bool) {
    let mut o = opts(&[]);
    o.launch.tls = tls;
    let mut c = LocalCluster::start(o, 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client.declare(&schema()).await.unwrap();
    client.put(MAP, key(1), key(1)).await.unwrap();
    // With three voters the removal is refused before anything happens: the leader keeps
    // leading, in the same term.
    let leader = leader_of(&c, &[1, 2, 3]).await;
    let before = c.client(leader).await.unwrap().status().await.unwrap();
    let err = c
        .client(leader)
        .await
        .unwrap()
        .admin()
        .remove(pb::RemoveRequest {
            node_id: leader,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("would leave 2 voters"), "{err}");
    let after = c.client(leader).await.unwrap().status().await.unwrap();
    assert_eq!((after.role.as_str(), after.term), ("leader", before.term));

    c.spawn(4, Some(1), false).unwrap();
    c.wait_ready(4, T).await.unwrap();
    let leader = leader_of(&c, &[1, 2, 3, 4]).await;
    // The join's membership change is over once the leader lists 4 as a voter and has
    // committed everything it has.
    c.wait_for(leader, T, "commit node 4 as a voter", |s| {
        s.members.iter().any(|m| m.node_id == 4 && m.voter) && s.committed_index == s.last_log_index
    })
    .await
    .unwrap();

    let admin = c.client(leader).await.unwrap();
    let mut api = admin.admin();
    let call = api.remove(pb::RemoveRequest {
        node_id: leader,
        force: false,
    });
    let m = tokio::time::timeout(T, call)
        .await
        .expect("a leader removing itself did not answer")
        .unwrap()
        .into_inner();
    let rest: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != leader).collect();
    let members: BTreeSet<u64> = m.members.iter().map(|m| m.node_id).collect();
    assert_eq!(members, rest.iter().copied().collect());
    c.kill(leader).unwrap();

    let other = c.client(rest[0]).await.unwrap();
    other.put(MAP, key(2), key(2)).await.unwrap();
    assert_eq!(converged(&mut c, &rest).await.len(), 2);
    id_cannot_come_back(&other, leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_removes_itself_with_tls() {
    a_leader_removes_itself(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_removes_itself_in_plaintext() {
    a_leader_removes_itself(false).await;
}

/// SIGTERM on the leader (a rolling restart, a drain) hands leadership to another voter before
/// the process exits, and removes nothing: the node comes back on its data dir as a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_over_and_stays_a_member() {
    // With a 20 s election timeout a leader's silence is noticed after 50 s or more, so a new
    // leader within 10 s can only come from the handover.
    let mut c = LocalCluster::start(opts(&["--election-timeout-ms", "20000"]), 3, 0, T)
        .await
        .unwrap();
    let client = c.client(1).await.unwrap();
    client.declare(&schema()).await.unwrap();
    client.put(MAP, key(1), key(1)).await.unwrap();
    let leader = leader_of(&c, &[1, 2, 3]).await;
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();

    let status = c.terminate(leader, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "the leader exited with {status}");
    let log = std::fs::read_to_string(&c.node(leader).unwrap().log_path).unwrap();
    assert!(
        log.contains("handed leadership on before stopping"),
        "{}",
        c.log_tail(leader, 20)
    );
    c.wait_for(
        rest[0],
        Duration::from_secs(10),
        "follow a new leader",
        |s| s.has_leader && s.leader_id != leader,
    )
    .await
    .unwrap();
    let other = c.client(rest[0]).await.unwrap();
    other.put(MAP, key(2), key(2)).await.unwrap();
    let members = other.status().await.unwrap().members;
    assert!(
        members.iter().any(|m| m.node_id == leader && m.voter),
        "SIGTERM removed node {leader}: {members:?}"
    );

    c.restart(leader).unwrap();
    c.wait_ready(leader, T).await.unwrap();
    assert_eq!(converged(&mut c, &[1, 2, 3]).await.len(), 2);
}

/// `--join` takes several members and keeps trying them, with backoff, until one answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tries_every_member_it_is_given_until_one_answers() {
    let mut c = LocalCluster::start(opts(&[]), 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client.declare(&schema()).await.unwrap();
    client.put(MAP, key(1), key(1)).await.unwrap();
    let api = |c: &LocalCluster, id: u64| c.node(id).unwrap().api_addr.clone();

    // The first member named is not there; the second is.
    let join = format!("{},{}", free_addr(), api(&c, 1));
    c.set_node_args(4, vec!["--join".into(), join, "--learner".into()]);
    c.spawn(4, None, false).unwrap();
    c.wait_ready(4, T).await.unwrap();

    // No member it names answers: it says why and keeps trying, and joins once one is back.
    c.kill(3).unwrap();
    let join = format!("{},{}", free_addr(), api(&c, 3));
    c.set_node_args(5, vec!["--join".into(), join, "--learner".into()]);
    c.spawn(5, None, false).unwrap();
    let log = c.node(5).unwrap().log_path.clone();
    let deadline = Instant::now() + T;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("could not join yet; retrying")
    {
        assert!(Instant::now() < deadline, "{}", c.log_tail(5, 20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.restart(3).unwrap();
    c.wait_ready(5, T).await.unwrap();
    let roles: Vec<(u64, bool)> = client
        .status()
        .await
        .unwrap()
        .members
        .iter()
        .map(|m| (m.node_id, m.voter))
        .collect();
    assert_eq!(
        roles,
        vec![(1, true), (2, true), (3, true), (4, false), (5, false)]
    );
    assert_eq!(converged(&mut c, &[1, 2, 3, 4, 5]).await.len(), 1);
}
