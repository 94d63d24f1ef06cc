//! Clusters that start themselves, as on Kubernetes: voters with automatic ids and the CA key
//! found the cluster once they see each other (`--bootstrap-expect`), agents with automatic
//! ids obtain their certificates with a shared enrollment credential and join, names are
//! recorded with the members, restarts keep ids, a voter whose disk is wiped comes back as a
//! new node of the same cluster instead of founding another (and its old id is removed once
//! the new one is a voter), and a learner gone longer than the limit is removed and comes back
//! as a new node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::storage::MapSchema;
use raftmap_node::tls::{Expect, Security};
use raftmap_node::Client;

const T: Duration = Duration::from_secs(60);

fn opts() -> ClusterOptions {
    ClusterOptions {
        launch: LaunchOptions::new(env!("CARGO_BIN_EXE_raftmap")),
        netns: false,
    }
}

async fn status(c: &LocalCluster, slot: u64) -> pb::StatusResponse {
    c.client(slot).await.unwrap().status().await.unwrap()
}

/// Waits until `slot`'s view of the members satisfies `cond`; returns it.
async fn members_until(
    c: &LocalCluster,
    slot: u64,
    what: &str,
    cond: impl Fn(&[pb::Member]) -> bool,
) -> Vec<pb::Member> {
    let deadline = Instant::now() + T;
    loop {
        let m = c.client(slot).await.unwrap().members().await.unwrap();
        if cond(&m.members) {
            return m.members;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: members are {:?}",
            m.members
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dump(c: &LocalCluster, slot: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    c.client(slot)
        .await
        .unwrap()
        .dump("flows", false)
        .await
        .map(|(_, _, entries)| entries)
        .unwrap_or_default()
}

async fn converged(c: &LocalCluster, slots: &[u64], want: usize) {
    let deadline = Instant::now() + T;
    loop {
        let mut dumps = Vec::new();
        for &s in slots {
            dumps.push(dump(c, s).await);
        }
        if dumps[0].len() == want && dumps.iter().all(|d| *d == dumps[0]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not converged: {:?}",
            dumps.iter().map(Vec::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_found_one_cluster_agents_enroll_and_a_wiped_voter_rejoins_as_a_new_node() {
    let mut c = LocalCluster::new(opts()).unwrap();
    let enroll = c.pki().unwrap().enroll_dir().unwrap();
    let join = three_voters(&mut c, &[]).await;

    // One cluster, named after the CA, of three voters with ids they drew and certificates
    // they issued themselves for exactly those ids.
    let mut ids = Vec::new();
    for slot in 1..=3 {
        let st = status(&c, slot).await;
        assert_eq!(st.cluster_id, "local");
        let tls = st.tls.expect("the voters run TLS");
        assert_eq!(
            tls.identity,
            format!("spiffe://raftmap/local/node/{}", st.node_id)
        );
        assert_eq!(st.node_name, format!("host-{slot}"));
        ids.push(st.node_id);
    }
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ids:?}");
    let members = members_until(&c, 1, "three named voters", |m| {
        m.len() == 3
            && m.iter()
                .all(|m| m.voter && m.node_name.starts_with("host-"))
    })
    .await;
    for (slot, id) in (1..=3).zip(&ids) {
        let m = members.iter().find(|m| m.node_id == *id).unwrap();
        assert_eq!(m.node_name, format!("host-{slot}"));
    }

    // An agent with an automatic id enrolls through the voters and joins as a learner.
    let agent_args = agent(&join, &enroll, &["--node-name", "worker-a"]);
    c.spawn_auto(4, agent_args).unwrap();
    c.wait_ready(4, T).await.unwrap();
    let agent = status(&c, 4).await;
    assert!(!ids.contains(&agent.node_id));
    assert_eq!(
        agent.tls.unwrap().identity,
        format!("spiffe://raftmap/local/node/{}", agent.node_id)
    );
    members_until(&c, 2, "the agent, named, as a learner", |m| {
        m.iter()
            .any(|m| m.node_id == agent.node_id && !m.voter && m.node_name == "worker-a")
    })
    .await;

    // Writes through the agent reach everyone.
    let client = c.client(4).await.unwrap();
    client
        .declare(&MapSchema::hash("flows", 8, 8, 1024))
        .await
        .unwrap();
    for k in 0..20u64 {
        client
            .put(
                "flows",
                k.to_be_bytes().to_vec(),
                (k * 3).to_be_bytes().to_vec(),
            )
            .await
            .unwrap();
    }
    converged(&c, &[1, 2, 3, 4], 20).await;

    // The enrollment credential obtains node certificates and nothing else: no reads, no
    // writes, and no certificate for an id a member holds.
    let credential = Security::from_dir(&enroll).unwrap();
    let ch = credential
        .connect(&c.node(1).unwrap().api_addr, Expect::AnyNode)
        .await
        .unwrap();
    let e = pb::kv_client::KvClient::new(ch.clone())
        .get(pb::GetRequest {
            map: "flows".into(),
            key: vec![0; 8],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = pb::admin_client::AdminClient::new(ch)
        .issue_node_certificate(pb::IssueNodeCertificateRequest {
            node_id: ids[0],
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    // A restarted agent keeps its id and its certificate: no new member.
    c.kill(4).unwrap();
    c.restart(4).unwrap();
    c.wait_ready(4, T).await.unwrap();
    assert_eq!(status(&c, 4).await.node_id, agent.node_id);
    assert_eq!(
        c.client(1)
            .await
            .unwrap()
            .members()
            .await
            .unwrap()
            .members
            .len(),
        4
    );

    // Voter 3 loses its disk: it comes back with a new id, joins the same cluster (it never
    // founds a second one: the others answer as members), and is promoted.
    c.kill(3).unwrap();
    std::fs::remove_dir_all(&c.node(3).unwrap().data_dir).unwrap();
    c.restart(3).unwrap();
    c.wait_ready(3, T).await.unwrap();
    let reborn = status(&c, 3).await;
    assert!(!ids.contains(&reborn.node_id) && reborn.node_id != agent.node_id);
    assert_eq!(reborn.cluster_id, "local");
    // It is promoted, and then (not before) the id it replaced is removed: three voters again.
    let old = ids[2];
    let members = members_until(&c, 1, "the new voter, and the old id removed", |m| {
        m.iter()
            .any(|m| m.node_id == reborn.node_id && m.voter && m.node_name == "host-3")
            && !m.iter().any(|m| m.node_id == old)
    })
    .await;
    assert_eq!(members.iter().filter(|m| m.voter).count(), 3, "{members:?}");
    let reborn_client = Client::connect(&[c.node(3).unwrap().api_addr.clone()], &c.security())
        .await
        .unwrap();
    reborn_client
        .put("flows", 99u64.to_be_bytes().to_vec(), vec![9; 8])
        .await
        .unwrap();
    converged(&c, &[1, 2, 3, 4], 21).await;
}

/// Starts three voters (on hosts `host-1` to `host-3`) founding a cluster by themselves, with
/// `extra` arguments, and waits until they are ready; returns the `--join` list.
async fn three_voters(c: &mut LocalCluster, extra: &[&str]) -> String {
    let ca = c.pki().unwrap().ca_dir();
    let join = (1..=3)
        .map(|s| c.place(s).unwrap().api_addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    for slot in 1..=3 {
        let mut args: Vec<String> = [
            "--bootstrap-expect",
            "3",
            "--join",
            &join,
            "--ca-dir",
            ca.to_str().unwrap(),
            "--node-name",
            &format!("host-{slot}"),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        c.spawn_auto(slot, args).unwrap();
    }
    for slot in 1..=3 {
        c.wait_ready(slot, T).await.unwrap();
    }
    join
}

/// The arguments of an agent that enrolls with `enroll` and joins `join` as a learner.
fn agent(join: &str, enroll: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--join", join, "--learner", "--enroll-dir"]
        .map(String::from)
        .to_vec();
    args.push(enroll.display().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Waits until `slot`'s process has exited; returns its log.
fn exited(c: &mut LocalCluster, slot: u64) -> String {
    let deadline = Instant::now() + T;
    while c.node_mut(slot).unwrap().exit_status().is_none() {
        assert!(Instant::now() < deadline, "node {slot} is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read_to_string(&c.node(slot).unwrap().log_path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_gone_longer_than_the_limit_is_removed_and_comes_back_as_a_new_node() {
    let mut c = LocalCluster::new(opts()).unwrap();
    let join = three_voters(&mut c, &["--reap-learners-after", "2s"]).await;
    let enroll = c.pki().unwrap().enroll_dir().unwrap();
    let agent_args = agent(&join, &enroll, &[]);
    c.spawn_auto(4, agent_args).unwrap();
    c.wait_ready(4, T).await.unwrap();
    let first = status(&c, 4).await.node_id;
    let client = c.client(1).await.unwrap();
    client
        .declare(&MapSchema::hash("flows", 8, 8, 1024))
        .await
        .unwrap();
    client.put("flows", vec![1; 8], vec![1; 8]).await.unwrap();
    converged(&c, &[1, 4], 1).await;

    // A learner that restarts within the limit stays.
    c.kill(4).unwrap();
    c.restart(4).unwrap();
    c.wait_ready(4, T).await.unwrap();
    assert_eq!(status(&c, 4).await.node_id, first);

    // Gone for longer than the limit: removed, its id retired. The cluster goes on writing.
    c.kill(4).unwrap();
    members_until(&c, 1, "the silent learner removed", |m| {
        m.len() == 3 && m.iter().all(|m| m.voter)
    })
    .await;
    client.put("flows", vec![2; 8], vec![2; 8]).await.unwrap();

    // Back on its data dir: it learns that it was removed, forgets its id and stops; started
    // again (as Kubernetes restarts a container), it joins as a new node and catches up.
    c.restart(4).unwrap();
    let log = exited(&mut c, 4);
    // (Either it finds its own log lists it and asks once no leader speaks to it, or, if it
    // was stopped before the entry that added it reached it, its join is refused.)
    assert!(
        log.contains(&format!(
            "node id {first} was removed from this cluster and cannot be reused"
        )),
        "{log}"
    );
    c.restart(4).unwrap();
    c.wait_ready(4, T).await.unwrap();
    let second = status(&c, 4).await.node_id;
    assert_ne!(second, first);
    members_until(&c, 2, "the agent back as a new learner", |m| {
        m.iter().any(|m| m.node_id == second && !m.voter) && !m.iter().any(|m| m.node_id == first)
    })
    .await;
    converged(&c, &[1, 2, 3, 4], 2).await;
    // Its old id stays retired.
    let e = c
        .client(1)
        .await
        .unwrap()
        .admin()
        .add_learner(pb::AddLearnerRequest {
            node_id: first,
            raft_addr: "127.0.0.1:1".into(),
            api_addr: "127.0.0.1:2".into(),
            cluster_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("cannot be reused"), "{e:?}");
}
