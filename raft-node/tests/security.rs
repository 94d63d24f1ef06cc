//! Mutual TLS and roles, end to end: real agents, real handshakes, and for every refusal the
//! proof that nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::storage::{MapSchema, Vote};
use raftmap_node::tls::issue::{self, Validity};
use raftmap_node::tls::{Principal, Role, Security, CA_FILE, CERT_FILE, KEY_FILE};
use raftmap_node::Client;
use rustls::pki_types::pem::PemObject;

const T: Duration = Duration::from_secs(60);

fn opts() -> ClusterOptions {
    ClusterOptions {
        launch: LaunchOptions::new(env!("CARGO_BIN_EXE_raftmap")),
        netns: false,
    }
}

fn key(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

async fn three_nodes() -> (LocalCluster, Client) {
    let mut c = LocalCluster::start(opts(), 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("m", 8, 8, 10_000))
        .await
        .unwrap();
    for i in 0..10 {
        client.put("m", key(i), key(i)).await.unwrap();
    }
    c.wait_applied(&[1, 2, 3], client.status().await.unwrap().applied_index, T)
        .await
        .unwrap();
    (c, client)
}

/// Every node's term, leader, last log index, members and data: what a refused call must not
/// move.
async fn fingerprint(c: &LocalCluster) -> Vec<(u64, u64, u64, Vec<u64>, Vec<(Vec<u8>, Vec<u8>)>)> {
    let mut out = Vec::new();
    for id in [1, 2, 3] {
        let client = c.client(id).await.unwrap();
        let s = client.status().await.unwrap();
        let members = s.members.iter().map(|m| m.node_id).collect();
        let dump = client.dump("m", false).await.unwrap().2;
        out.push((s.term, s.leader_id, s.last_log_index, members, dump));
    }
    out
}

/// An identity directory trusting `trust` (PEM), holding `issued`.
fn identity_dir(dir: &Path, trust: &str, issued: &issue::Issued) -> PathBuf {
    issue::write_identity(dir, trust, issued, true).unwrap();
    dir.to_path_buf()
}

fn ca_pem(c: &LocalCluster) -> String {
    std::fs::read_to_string(c.pki().unwrap().ca_dir().join(CA_FILE)).unwrap()
}

/// Issues a certificate for `who` from the cluster's CA into a directory of its own.
fn issue_for(c: &LocalCluster, name: &str, who: &Principal, validity: Validity) -> Security {
    Security::from_dir(c.pki().unwrap().issue(name, who, validity).unwrap()).unwrap()
}

async fn client_with(c: &LocalCluster, id: u64, security: &Security) -> Client {
    Client::connect(&[c.node(id).unwrap().api_addr.clone()], security)
        .await
        .unwrap()
}

fn expect_refused<T: std::fmt::Debug>(
    r: Result<T, raftmap_node::NodeError>,
    code: tonic::Code,
    why: &str,
) {
    let e = tonic::Status::from(r.unwrap_err());
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(why), "expected {why:?}: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_or_role_are_refused_and_change_nothing() {
    let (c, _) = three_nodes().await;
    let before = fingerprint(&c).await;
    let tmp = tempfile::tempdir().unwrap();
    let cluster = c.pki().unwrap().cluster().to_string();
    let refusals = |c: &LocalCluster| -> f64 {
        [1, 2, 3]
            .into_iter()
            .map(|id| c.counter(id, "raftmap_refused_calls_total").unwrap())
            .sum()
    };
    let refused_before = refusals(&c);

    // No certificate: a directory with only the CA, so the client checks the server but
    // presents nothing.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join(CA_FILE), ca_pem(&c)).unwrap();
    let none = client_with(&c, 1, &Security::from_dir(&bare).unwrap()).await;
    expect_refused(
        none.get("m", key(1), true).await,
        tonic::Code::Unauthenticated,
        "requires a client certificate",
    );
    expect_refused(
        none.put("m", key(1), key(9)).await,
        tonic::Code::Unauthenticated,
        "requires a client certificate",
    );

    // A certificate from another CA (for the same cluster name), trusted by nobody in it.
    let other = issue::new_ca(&cluster, Validity::days(1)).unwrap();
    let other_dir = tmp.path().join("other-ca");
    issue::write_ca(&other_dir, &other, false).unwrap();
    let forged = issue::issue(
        &other_dir,
        &Principal::client(&cluster, Role::Admin, "intruder"),
        Validity::days(1),
        &[],
        &[],
    )
    .unwrap();
    let both = format!("{}{}", ca_pem(&c), other.cert_pem);
    let intruder = identity_dir(&tmp.path().join("intruder"), &both, &forged);
    let intruder = client_with(&c, 1, &Security::from_dir(intruder).unwrap()).await;
    expect_refused(
        intruder.put("m", key(1), key(9)).await,
        tonic::Code::Unauthenticated,
        "not signed by a trusted CA",
    );
    let remove = intruder
        .admin()
        .remove(pb::RemoveRequest {
            node_id: 3,
            force: true,
        })
        .await;
    assert_eq!(remove.unwrap_err().code(), tonic::Code::Unauthenticated);

    // An expired certificate: valid when loaded, expired when used.
    let now = time::OffsetDateTime::now_utc();
    let short = Validity {
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::seconds(2),
    };
    let expiring = issue_for(
        &c,
        "expiring",
        &Principal::client(&cluster, Role::Admin, "old"),
        short,
    );
    let deadline = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_secs(short.not_after.unix_timestamp() as u64 + 1);
    while std::time::SystemTime::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = client_with(&c, 2, &expiring).await;
    expect_refused(
        expired.put("m", key(1), key(9)).await,
        tonic::Code::Unauthenticated,
        "expired",
    );

    // A reader reads, and may not put, compare-and-swap, declare or remove.
    let reader = issue_for(
        &c,
        "reader",
        &Principal::client(&cluster, Role::Reader, "dash"),
        Validity::days(1),
    );
    for id in [1, 2, 3] {
        let r = client_with(&c, id, &reader).await;
        assert_eq!(r.get("m", key(1), true).await.unwrap(), Some(key(1)));
        expect_refused(
            r.put("m", key(1), key(9)).await,
            tonic::Code::PermissionDenied,
            "needs the writer role",
        );
        let cas = r
            .write(vec![pb::op::Op::Cas(pb::CompareAndSwap {
                map: "m".into(),
                key: key(1),
                expected: Some(key(1)),
                new_value: Some(key(9)),
            })])
            .await;
        expect_refused(cas, tonic::Code::PermissionDenied, "needs the writer role");
        expect_refused(
            r.declare(&MapSchema::hash("new", 8, 8, 10)).await,
            tonic::Code::PermissionDenied,
            "needs the writer role",
        );
        let e = r
            .admin()
            .remove(pb::RemoveRequest {
                node_id: 3,
                force: true,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("needs the admin role"), "{e:?}");
    }
    // A writer writes, and may not change the membership.
    let writer = issue_for(
        &c,
        "writer",
        &Principal::client(&cluster, Role::Writer, "app"),
        Validity::days(1),
    );
    let w = client_with(&c, 3, &writer).await;
    let e = w
        .admin()
        .remove(pb::RemoveRequest {
            node_id: 3,
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // Nothing changed anywhere; every refusal was counted once: 2 without a certificate, 2
    // from another CA, 1 expired, 4 for the reader on each of 3 nodes, 1 for the writer.
    assert_eq!(fingerprint(&c).await, before);
    assert_eq!(refusals(&c) - refused_before, 18.0);
}

/// A vote request, an append with one put, a snapshot header, a forwarded proposal and a
/// leadership transfer, all as node `claimed` would send them: each must be refused without
/// changing anything.
async fn every_peer_call_refused(
    p: &mut common::Peer,
    to: u64,
    claimed: u64,
    term: u64,
    why: &str,
) {
    let vote = openraft::raft::VoteRequest::<raftmap_node::storage::TypeConfig>::new(
        Vote::new(term + 1, claimed),
        None,
    );
    denied("vote", p.vote(payload(&vote)).await, Some(why));
    let append = openraft::raft::AppendEntriesRequest::<raftmap_node::storage::TypeConfig> {
        vote: Vote::new_committed(term + 1, claimed),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let stream = futures_util::stream::iter([payload(&append)]);
    denied("append", p.append_entries(stream).await, None);
    let header = pb::RaftPayload { data: vec![0; 16] };
    let stream = futures_util::stream::iter([header]);
    denied("snapshot", p.install_snapshot(stream).await, None);
    let proposal = raftmap_node::storage::Proposal {
        batches: vec![raftmap_node::storage::ClientBatch {
            origin: claimed,
            seq: 1,
            source: raftmap_node::storage::Source::Api,
            ops: vec![raftmap_node::storage::Op::Put {
                map: "m".into(),
                key: key(1),
                value: key(666),
            }],
        }],
        admin: vec![],
    };
    denied("propose", p.propose(payload(&proposal)).await, Some(why));
    // A leadership transfer to the node called would start an election there.
    let transfer = openraft::raft::TransferLeaderRequest::<raftmap_node::storage::TypeConfig>::new(
        Vote::new_committed(term, claimed),
        to,
        None,
    );
    denied(
        "transfer",
        p.transfer_leader(payload(&transfer)).await,
        Some(why),
    );
}

/// A peer call refused with PERMISSION_DENIED (naming `why`, when given).
fn denied<T: std::fmt::Debug>(what: &str, res: Result<T, tonic::Status>, why: Option<&str>) {
    let e = res.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
    if let Some(why) = why {
        assert!(e.message().contains(why), "{what}: {e:?}");
    }
}

/// A peer message as it goes on the wire (postcard).
fn payload<T: serde::Serialize>(v: &T) -> pb::RaftPayload {
    pb::RaftPayload {
        data: postcard::to_stdvec(v).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_of_strangers_removed_nodes_other_ids_and_other_clusters_are_refused() {
    let (mut c, admin) = three_nodes().await;
    let cluster = c.pki().unwrap().cluster().to_string();
    // Node 4 joins, then is removed: its certificate stays valid, its membership does not.
    c.spawn(4, Some(1), true).unwrap();
    c.wait_ready(4, T).await.unwrap();
    admin
        .admin()
        .remove(pb::RemoveRequest {
            node_id: 4,
            force: false,
        })
        .await
        .unwrap();
    c.kill(4).unwrap();
    let before = fingerprint(&c).await;
    let term = before[0].0;
    let leader = before[0].1;
    let target = [1, 2, 3].into_iter().find(|&n| n != leader).unwrap();

    // A valid node certificate of a node that never was a member.
    let stranger = issue_for(
        &c,
        "node-99",
        &Principal::node(&cluster, 99),
        Validity::days(1),
    );
    let headers = |from| common::Headers {
        cluster: cluster.clone(),
        from,
        to: target,
    };
    let mut p = common::peer_with(&c, target, &stranger, headers(99)).await;
    every_peer_call_refused(&mut p, target, 99, term, "node 99 is not a member").await;
    // The removed node.
    let mut p = common::peer_as(&c, target, 4).await;
    every_peer_call_refused(&mut p, target, 4, term, "node 4 is not a member").await;
    // Node 2's certificate used by "node 3".
    let other = [1, 2, 3]
        .into_iter()
        .find(|&n| n != target && n != leader)
        .unwrap();
    let mut p = common::peer_with(
        &c,
        target,
        &common::node_security(&c, other),
        headers(leader),
    )
    .await;
    every_peer_call_refused(
        &mut p,
        target,
        leader,
        term,
        &format!("the certificate is node {other}'s, the call claims to come from node {leader}"),
    )
    .await;
    // A member's certificate with another cluster's id on its calls: refused, and logged with
    // both ids.
    let wrong = common::Headers {
        cluster: "elsewhere".into(),
        from: other,
        to: target,
    };
    let mut p = common::peer_with(&c, target, &common::node_security(&c, other), wrong).await;
    every_peer_call_refused(
        &mut p,
        target,
        other,
        term,
        "from cluster elsewhere, this is cluster local",
    )
    .await;
    let log = std::fs::read_to_string(&c.node(target).unwrap().log_path).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ours=local") && l.contains("theirs=elsewhere")),
        "{}",
        c.log_tail(target, 20)
    );

    assert_eq!(fingerprint(&c).await, before);
    c.check_alive("after the refused peer calls").unwrap();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_write_load_with_no_failed_write_and_the_old_ca_retires() {
    let (c, _) = three_nodes().await;
    let cluster = c.pki().unwrap().cluster().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let old_ca = ca_pem(&c);
    let writer_who = Principal::client(&cluster, Role::Writer, "app");
    let writer_dir = c
        .pki()
        .unwrap()
        .issue("app", &writer_who, Validity::days(1))
        .unwrap();
    let writer = Security::from_dir(&writer_dir).unwrap();
    writer.watch(Duration::from_millis(200)).unwrap();

    // Writes, one after another, through every node, for the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (written, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for id in [1, 2, 3] {
        let client = client_with(&c, id, &writer).await;
        let (stop, written, failed) = (stop.clone(), written.clone(), failed.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 100_000 {
                match client.put("m", key(1000 * id + i % 500), key(i)).await {
                    Ok(_) => written.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("write failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                i += 1;
            }
        }));
    }
    let reloads = |n: f64| {
        [1, 2, 3]
            .into_iter()
            .all(|id| c.counter(id, "raftmap_cert_reloads_total").unwrap_or(0.0) >= n)
    };
    let progress = |from: u64| {
        wait_until("writes going on", || {
            written.load(Ordering::SeqCst) > from + 20
        });
        written.load(Ordering::SeqCst)
    };
    let mut seen = progress(0);

    // 1. Every directory trusts the old and the new CA.
    let new = issue::new_ca(&cluster, Validity::days(60)).unwrap();
    let new_ca_dir = tmp.path().join("new-ca");
    issue::write_ca(&new_ca_dir, &new, false).unwrap();
    let both = format!("{old_ca}{}", new.cert_pem);
    let dirs: Vec<(Principal, PathBuf)> = [1, 2, 3]
        .into_iter()
        .map(|id| (Principal::node(&cluster, id), c.tls_dir(id).unwrap()))
        .chain([(writer_who.clone(), writer_dir.clone())])
        .collect();
    for (_, d) in &dirs {
        issue::write_file(&d.join(CA_FILE), &both, false, true).unwrap();
    }
    wait_until("the bundle loaded everywhere", || reloads(1.0));
    seen = progress(seen);

    // 2. New certificates from the new CA, key first.
    let mut new_expiry = std::collections::BTreeMap::new();
    for (who, d) in &dirs {
        let cert = issue::issue(&new_ca_dir, who, Validity::days(20), &[], &[]).unwrap();
        issue::write_file(&d.join(KEY_FILE), &cert.key_pem, true, true).unwrap();
        issue::write_file(&d.join(CERT_FILE), &cert.cert_pem, false, true).unwrap();
        if let Some(id) = who.node_id() {
            let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())
                .unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            new_expiry.insert(id, x.validity().not_after.timestamp());
        }
    }
    wait_until("the new certificates loaded everywhere", || reloads(2.0));
    seen = progress(seen);

    // 3. The old CA retires.
    for (_, d) in &dirs {
        issue::write_file(&d.join(CA_FILE), &new.cert_pem, false, true).unwrap();
    }
    wait_until("the old CA retired everywhere", || reloads(3.0));
    progress(seen);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "writes failed during the rotation"
    );

    // Each node serves its new certificate to a client that trusts only the new CA.
    let fresh = issue::issue(
        &new_ca_dir,
        &Principal::client(&cluster, Role::Admin, "ops"),
        Validity::days(1),
        &[],
        &[],
    )
    .unwrap();
    let fresh =
        Security::from_dir(identity_dir(&tmp.path().join("ops"), &new.cert_pem, &fresh)).unwrap();
    for id in [1, 2, 3] {
        let s = client_with(&c, id, &fresh).await.status().await.unwrap();
        assert_eq!(s.tls.unwrap().expires_unix, new_expiry[&id], "node {id}");
    }
    // A certificate of the old CA is no longer accepted.
    let old_admin = c.security();
    let e = Client::connect(&[c.node(1).unwrap().api_addr.clone()], &old_admin).await;
    assert!(e.is_err(), "a client of the retired CA still connects");
    // The cluster still replicates: one more write reaches every node.
    let client = client_with(&c, 1, &fresh).await;
    client.put("m", key(424_242), key(1)).await.unwrap();
    let index = client.status().await.unwrap().applied_index;
    for id in [1, 2, 3] {
        let n = client_with(&c, id, &fresh).await;
        let deadline = Instant::now() + T;
        while n.status().await.unwrap().applied_index < index {
            assert!(Instant::now() < deadline, "node {id} did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(n.get("m", key(424_242), false).await.unwrap(), Some(key(1)));
    }
}

#[test]
fn an_agent_without_tls_on_a_non_loopback_address_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftmap"))
        .args([
            "agent",
            "--node-id",
            "1",
            "--raft-addr",
            "0.0.0.0:7400",
            "--api-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("without TLS") && lines[0].contains("--insecure"),
        "{err}"
    );
    // Nothing was created.
    assert!(!dir.path().join("d").exists());
}

fn raftmap(args: &[&str], dir: &Path) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftmap"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_made_with_the_cli_run_a_node_that_takes_its_id_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let run = |args: &[&str]| {
        let (ok, out, err) = raftmap(args, d);
        assert!(ok, "raftmap {args:?}: {err}");
        out
    };
    run(&["certs", "ca", "--cluster", "prod", "--out", "ca"]);
    run(&[
        "certs",
        "node",
        "--ca",
        "ca",
        "--node-id",
        "7",
        "--out",
        "node-7",
    ]);
    run(&[
        "certs", "client", "--ca", "ca", "--role", "admin", "--name", "ops", "--out", "ops",
    ]);
    run(&[
        "certs", "client", "--ca", "ca", "--role", "reader", "--name", "dash", "--out", "dash",
    ]);
    let shown = run(&["certs", "show", "node-7"]);
    assert!(
        shown.contains("node 7 of cluster prod") && shown.contains("usable"),
        "{shown}"
    );
    // The CA key never lands in an identity directory, and keys are private.
    assert!(!d.join("node-7").join(issue::CA_KEY_FILE).exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("ops").join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    // The CA is not replaced by accident.
    let (ok, _, err) = raftmap(&["certs", "ca", "--cluster", "prod", "--out", "ca"], d);
    assert!(!ok && err.contains("--force"), "{err}");
    // A client certificate does not make a node.
    let (ok, _, err) = raftmap(
        &[
            "agent",
            "--tls-dir",
            "ops",
            "--data-dir",
            "x",
            "--raft-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
        ],
        d,
    );
    assert!(!ok && err.contains("node certificate"), "{err}");

    let port = |l: std::net::TcpListener| l.local_addr().unwrap().to_string();
    let raft = port(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let api = port(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    /// Killed when the test ends, passed or not.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_raftmap"))
            .args([
                "agent",
                "--tls-dir",
                "node-7",
                "--data-dir",
                "data",
                "--raft-addr",
                &raft,
                "--api-addr",
                &api,
            ])
            .current_dir(d)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ops = Security::from_dir(d.join("ops")).unwrap();
    let deadline = Instant::now() + T;
    let client = loop {
        if let Ok(c) = Client::connect(std::slice::from_ref(&api), &ops).await {
            break c;
        }
        assert!(Instant::now() < deadline, "the agent did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let init = run(&["cluster", "init", "--tls-dir", "ops", "--endpoints", &api]);
    assert!(init.contains("cluster prod with node 7"), "{init}");
    let s = client.status().await.unwrap();
    assert_eq!((s.node_id, s.cluster_id.as_str()), (7, "prod"));
    let status = run(&["status", "--tls-dir", "dash", "--endpoints", &api]);
    assert!(status.contains("spiffe://raftmap/prod/node/7"), "{status}");
    run(&[
        "map",
        "declare",
        "m",
        "--key-size",
        "1",
        "--value-size",
        "1",
        "--tls-dir",
        "ops",
        "--endpoints",
        &api,
    ]);
    let (ok, _, err) = raftmap(
        &[
            "map",
            "put",
            "m",
            "01",
            "02",
            "--tls-dir",
            "dash",
            "--endpoints",
            &api,
        ],
        d,
    );
    assert!(!ok && err.contains("needs the writer role"), "{err}");
    let (ok, _, err) = raftmap(&["map", "list", "--endpoints", &api], d);
    assert!(
        !ok && err.contains(&format!("{api} requires TLS: pass --tls-dir")),
        "{err}"
    );
}
