//! The Kubernetes manifests of `deploy/`, run: the voter StatefulSet and the agent DaemonSet
//! of the rendered `kubectl kustomize` output become containers of the image that
//! `deploy/image/build.sh` builds, with exactly their command lines, env, users,
//! capabilities, seccomp, read-only root filesystems, mounts and probes (`tests/pods`). Each
//! Kubernetes node and each voter pod is a network namespace of a test network; each node has
//! its own bpffs (the agents' `/sys/fs/bpf` hostPath) and data dir; Service names resolve
//! through `--add-host`.
//!
//! One scenario, in order: three voters found the cluster themselves; two agents join with
//! automatic ids and keep their kernel maps identical while a writer updates them; an agent
//! container is replaced (same id, its map never emptied); a voter's volume is wiped (new id,
//! promoted, the old id removed); an agent stopped longer than the reap limit is removed and
//! comes back as a new node with what changed on its host while it was away; an agent without
//! the seccomp exception is not ready and says why; every container is restarted one at a
//! time while writes keep being acknowledged. Timings are printed (`--nocapture`).
//!
//! Needs root, BPF, podman, runc, debootstrap and kubectl (`scripts/install-deps.sh`); under
//! `RAFTMAP_REQUIRE_BPF=1` (CI) a missing piece fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pods;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pods::{
    chown, sh, sweep_stale_dirs, wait_until, Bpffs, Pod, PodSpec, Podman, Rendered, Workload,
    STATE_PREFIX,
};
use raftmap_ebpf_hooks::{KernelMap, MapKind, UpdateFlags};
use raftmap_jepsen::cluster::Netns;
use raftmap_node::proto as pb;
use raftmap_node::storage::MapSchema;
use raftmap_node::tls::Security;
use raftmap_node::Client;

const NS: &str = "raftmap";
/// The image the manifests name, which `deploy/image/build.sh` builds by default.
const MANIFEST_IMAGE: &str = "localhost/raftmap:0.1.0";
/// What the test builds from its own binary and runs instead.
const TEST_IMAGE: &str = "localhost/raftmap:e2e";
/// The one setting the test changes: learners are reaped after seconds, not 30 minutes.
const REAP: &str = "4s";
const T: Duration = Duration::from_secs(90);
/// The watched map of `deploy/base/agent.toml`, and its shape here.
const MAP_PIN: &str = "raftmap/conntrack";
const KEY: u32 = 16;
const VALUE: u32 = 16;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn required() -> bool {
    std::env::var("RAFTMAP_REQUIRE_BPF").as_deref() == Ok("1")
}

/// Whether everything the test needs is here; fails under RAFTMAP_REQUIRE_BPF=1 otherwise.
fn prerequisites() -> bool {
    if !raftmap_ebpf_hooks::bpf_or_skip("kubernetes") {
        return false;
    }
    let missing: Vec<&str> = ["kubectl", "podman", "runc", "debootstrap", "ip"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "missing {} (scripts/install-deps.sh installs them)",
        missing.join(", ")
    );
    if required() {
        panic!("kubernetes: required (RAFTMAP_REQUIRE_BPF=1): {why}");
    }
    eprintln!("SKIPPED kubernetes: {why}");
    false
}

/// A Kubernetes node of the test: a namespace, a bpffs, a /var/lib/raftmap, and the kernel
/// map its application pinned.
struct Node {
    name: String,
    ip: String,
    netns: PathBuf,
    bpffs: Bpffs,
    data: PathBuf,
}

impl Node {
    fn map(&self) -> KernelMap {
        KernelMap::open_pinned(&self.bpffs.0.join(MAP_PIN)).unwrap()
    }
}

/// Everything the pods of the test are made from.
struct Cluster {
    podman: Podman,
    net: Netns,
    dir: PathBuf,
    voters: Workload,
    agents: Workload,
    hosts: Vec<(String, String)>,
    nodes: Vec<Node>,
    /// Voter ordinal -> its pod IP.
    voter_ips: Vec<String>,
    admin: Security,
    /// Pod name -> container name, of the pods running now.
    running: BTreeMap<String, String>,
    next_agent: usize,
}

impl Cluster {
    fn voter_pod(&self, ordinal: usize) -> Pod {
        let node = &self.nodes[ordinal % self.nodes.len()];
        let name = format!("raftmap-voter-{ordinal}");
        let mut volumes = self.common_volumes();
        volumes.insert("data".into(), self.dir.join(format!("pvc/data-{name}")));
        Pod {
            name,
            namespace: NS.into(),
            ip: self.voter_ips[ordinal].clone(),
            host_ip: node.ip.clone(),
            node_name: node.name.clone(),
            netns: self.net.path(1 + ordinal as u64),
            volumes,
            hosts: self.hosts.clone(),
            annotations: self.voters.template.metadata.annotations.clone(),
        }
    }

    fn agent_pod(&mut self, node: usize) -> Pod {
        self.next_agent += 1;
        let n = &self.nodes[node];
        let mut volumes = self.common_volumes();
        volumes.insert("bpffs".into(), n.bpffs.0.clone());
        volumes.insert("data".into(), n.data.clone());
        Pod {
            // DaemonSet pods get a new name each time.
            name: format!("raftmap-agent-{:05x}", self.next_agent * 7919),
            namespace: NS.into(),
            ip: n.ip.clone(),
            host_ip: n.ip.clone(),
            node_name: n.name.clone(),
            netns: n.netns.clone(),
            volumes,
            hosts: self.hosts.clone(),
            annotations: self.agents.template.metadata.annotations.clone(),
        }
    }

    fn common_volumes(&self) -> BTreeMap<String, PathBuf> {
        BTreeMap::from([
            ("config".to_string(), self.dir.join("config")),
            ("ca".to_string(), self.dir.join("secrets/raftmap-ca")),
            (
                "enroll".to_string(),
                self.dir.join("secrets/raftmap-enroll"),
            ),
        ])
    }

    fn start(&mut self, pod: &Pod, spec: &PodSpec) -> String {
        let c = &spec.containers[0];
        let name = self.podman.start(pod, spec, c);
        self.running.insert(pod.name.clone(), name.clone());
        name
    }

    fn start_voter(&mut self, ordinal: usize) -> Pod {
        let pod = self.voter_pod(ordinal);
        let spec = self.voters.template.spec.clone();
        self.start(&pod, &spec);
        pod
    }

    fn start_agent(&mut self, node: usize) -> Pod {
        let pod = self.agent_pod(node);
        let spec = self.agents.template.spec.clone();
        self.start(&pod, &spec);
        pod
    }

    /// Deletes a pod: SIGTERM, the grace period, then the container is gone.
    fn delete(&mut self, pod: &Pod) -> i64 {
        let name = self.running.remove(&pod.name).unwrap();
        let code = self.podman.stop(&name);
        self.podman.remove(&name);
        code
    }

    /// Waits until the pod's readiness probe passes (its startup and liveness probes too);
    /// returns how long it took.
    fn wait_ready(&self, pod: &Pod, spec: &PodSpec) -> Duration {
        let c = &spec.containers[0];
        let started = Instant::now();
        for (what, probe) in [
            ("startup", &c.startup_probe),
            ("readiness", &c.readiness_probe),
            ("liveness", &c.liveness_probe),
        ] {
            let probe = probe.as_ref().unwrap_or_else(|| panic!("no {what} probe"));
            let (addr, path) = pod.probe_target(c, probe);
            let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1));
            wait_until(&format!("{} {what} probe {path}", pod.name), T, || {
                match raftmap_node::launcher::http_get_within(addr, &path, timeout) {
                    Ok((200, body)) => (true, body),
                    Ok((code, body)) => (false, format!("{code} {body}")),
                    Err(e) => (false, e.to_string()),
                }
            });
        }
        started.elapsed()
    }

    fn probe(&self, pod: &Pod, spec: &PodSpec) -> (u16, String) {
        let c = &spec.containers[0];
        let (addr, path) = pod.probe_target(c, c.readiness_probe.as_ref().unwrap());
        raftmap_node::launcher::http_get_within(addr, &path, Duration::from_secs(2))
            .unwrap_or((0, String::new()))
    }

    fn voter_endpoints(&self) -> Vec<String> {
        self.voter_ips
            .iter()
            .map(|ip| format!("{ip}:7401"))
            .collect()
    }
}

fn client(rt: &tokio::runtime::Runtime, endpoints: &[String], admin: &Security) -> Client {
    rt.block_on(Client::connect(endpoints, admin)).unwrap()
}

fn status(rt: &tokio::runtime::Runtime, c: &Cluster, ip: &str) -> pb::StatusResponse {
    let cl = client(rt, &[format!("{ip}:7401")], &c.admin);
    rt.block_on(cl.status()).unwrap()
}

fn members(rt: &tokio::runtime::Runtime, c: &Cluster) -> Vec<pb::Member> {
    let cl = client(rt, &c.voter_endpoints(), &c.admin);
    rt.block_on(cl.members())
        .map(|m| m.members)
        .unwrap_or_default()
}

fn wait_members(
    rt: &tokio::runtime::Runtime,
    c: &Cluster,
    what: &str,
    cond: impl Fn(&[pb::Member]) -> bool,
) -> Vec<pb::Member> {
    wait_until(what, T, || {
        let m = members(rt, c);
        (cond(&m), m)
    })
}

type Entries = HashMap<Vec<u8>, Vec<u8>>;

/// Waits until every node's kernel map holds the same entries as the cluster's map; returns
/// them.
fn converged(rt: &tokio::runtime::Runtime, c: &Cluster, nodes: &[usize]) -> Entries {
    let cl = client(rt, &c.voter_endpoints(), &c.admin);
    wait_until("kernel maps equal to the cluster's", T, || {
        let cluster: Entries = rt
            .block_on(cl.dump("conntrack", true))
            .map(|(_, _, e)| e.into_iter().collect())
            .unwrap_or_default();
        let kernels: Vec<Entries> = nodes
            .iter()
            .map(|&n| c.nodes[n].map().entries().unwrap())
            .collect();
        let same = kernels.iter().all(|k| *k == cluster);
        let sizes: Vec<usize> = kernels.iter().map(HashMap::len).collect();
        (same, (cluster.len(), sizes, cluster))
    })
    .2
}

fn key(tag: u8, i: u32) -> Vec<u8> {
    let mut k = vec![tag; KEY as usize];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k
}

fn value(i: u32) -> Vec<u8> {
    let mut v = vec![0u8; VALUE as usize];
    v[..4].copy_from_slice(&i.to_be_bytes());
    v
}

/// Writes through the API to the voters until stopped, reconnecting when the node it talks to
/// goes; records when each write was acknowledged.
fn api_writer(
    rt: &tokio::runtime::Runtime,
    endpoints: Vec<String>,
    admin: Security,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, u64)>> {
    rt.spawn(async move {
        let mut acked = Vec::new();
        let mut cl: Option<Client> = None;
        let mut i = 0u64;
        let mut order = endpoints.clone();
        while !stop.load(Ordering::Relaxed) && i < 20_000 {
            if cl.is_none() {
                order.rotate_left(1);
                cl = Client::connect(&order, &admin).await.ok();
            }
            let Some(c) = &cl else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let put = c.put("writes", i.to_be_bytes().to_vec(), i.to_le_bytes().to_vec());
            match tokio::time::timeout(Duration::from_secs(5), put).await {
                Ok(Ok(_)) => {
                    acked.push((Instant::now(), i));
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => cl = None,
            }
        }
        acked
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn the_rendered_manifests_run_as_containers_bootstrap_sync_kernel_maps_and_survive_replacements_reaping_and_a_rolling_restart(
) {
    if !prerequisites() {
        return;
    }
    let mut figures = Figures::default();
    let mut note = |what: &str, value: String| figures.note(what, value);
    sweep_stale_dirs();
    let tmp = tempfile::Builder::new()
        .prefix(STATE_PREFIX)
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("owner"), pods::owner(std::process::id()).unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_raftmap");

    // The image, from this build's binary, as deploy/image/build.sh makes it.
    let t = Instant::now();
    let built = sh(Command::new(deploy_dir().join("image/build.sh"))
        .args(["--binary", bin, "--tag", TEST_IMAGE]));
    note(
        "image build",
        format!("{:.1?} ({})", t.elapsed(), built.trim()),
    );

    // The manifests: deploy/base with one change, learners reaped after seconds.
    let overlay = dir.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let base = deploy_dir().join("base").canonicalize().unwrap();
    let voter_toml = std::fs::read_to_string(base.join("voter.toml")).unwrap();
    assert!(voter_toml.contains("reap_learners_after"), "{voter_toml}");
    let fast: String = voter_toml
        .lines()
        .map(|l| match l.starts_with("reap_learners_after") {
            true => format!("reap_learners_after = \"{REAP}\"\n"),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(overlay.join("voter.toml"), fast).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\nconfigMapGenerator:\n  - name: raftmap-config\n    behavior: merge\n    files:\n      - voter.toml\n",
            // Kustomize takes only relative paths: up to / and down again.
            Path::new(&"../".repeat(overlay.canonicalize().unwrap().components().count() - 1))
                .join(base.strip_prefix("/").unwrap())
                .display()
        ),
    )
    .unwrap();
    let rendered = Rendered::render(Path::new("kubectl"), &overlay);
    let voters = rendered.workload("StatefulSet", "raftmap-voter");
    let agents = rendered.workload("DaemonSet", "raftmap-agent");
    let replicas = voters.replicas.unwrap() as usize;
    assert_eq!(replicas, 3);
    for w in [&voters, &agents] {
        assert_eq!(w.template.spec.containers[0].image, MANIFEST_IMAGE);
    }
    assert!(agents.template.spec.host_network);

    // The ConfigMap and the two Secrets, as the kubelet would mount them.
    let config_volume = voters
        .template
        .spec
        .volumes
        .iter()
        .find(|v| v.name == "config")
        .unwrap();
    let cm_name = config_volume.config_map.as_ref().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cm_name.starts_with("raftmap-config-"),
        "{cm_name}: the name carries the checksum"
    );
    let cm = rendered.config_map(&cm_name);
    std::fs::create_dir_all(dir.join("config")).unwrap();
    for (file, text) in &cm.data {
        std::fs::write(dir.join("config").join(file), text).unwrap();
    }
    let ca = dir.join("pki/ca");
    sh(Command::new(bin)
        .args(["certs", "ca", "--cluster", NS, "--out"])
        .arg(&ca));
    let enroll = dir.join("secrets/raftmap-enroll");
    sh(Command::new(bin)
        .args(["certs", "enroll", "--name", "agents", "--ca"])
        .arg(&ca)
        .arg("--out")
        .arg(&enroll));
    let admin_dir = dir.join("pki/admin");
    sh(Command::new(bin)
        .args([
            "certs", "client", "--role", "admin", "--name", "operator", "--ca",
        ])
        .arg(&ca)
        .arg("--out")
        .arg(&admin_dir));
    let ca_secret = dir.join("secrets/raftmap-ca");
    std::fs::create_dir_all(&ca_secret).unwrap();
    let fs_group = voters.template.spec.security_context.fs_group.unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(ca.join(f), ca_secret.join(f)).unwrap();
    }
    for (secret, vol) in [(&ca_secret, &voters), (&enroll, &agents)] {
        let mode = vol
            .template
            .spec
            .volumes
            .iter()
            .find_map(|v| v.secret.as_ref())
            .unwrap()
            .default_mode
            .unwrap();
        let group = vol.template.spec.security_context.fs_group.unwrap_or(0);
        for f in std::fs::read_dir(secret).unwrap() {
            chown(&f.unwrap().path(), 0, group, mode);
        }
    }
    let admin = Security::from_dir(&admin_dir).unwrap();

    // The network: voter pods at 1..=3, Kubernetes nodes at 11.. (their agents' host network).
    let net = Netns::new().unwrap();
    let node_names = ["kube-a", "kube-b", "kube-c"];
    let mut nodes = Vec::new();
    for (i, name) in node_names.iter().enumerate() {
        let id = 11 + i as u64;
        net.add_node(id).unwrap();
        let bpffs = Bpffs::mount(dir.join(format!("nodes/{name}/bpffs")));
        std::fs::create_dir_all(bpffs.0.join("raftmap")).unwrap();
        KernelMap::create(MapKind::Hash, KEY, VALUE, 4096, "conntrack")
            .unwrap()
            .pin(&bpffs.0.join(MAP_PIN))
            .unwrap();
        // The kubelet makes a DirectoryOrCreate hostPath.
        let data = dir.join(format!("nodes/{name}/var-lib-raftmap"));
        std::fs::create_dir_all(&data).unwrap();
        nodes.push(Node {
            name: name.to_string(),
            ip: net.ip(id),
            netns: net.path(id),
            bpffs,
            data,
        });
    }
    let mut voter_ips = Vec::new();
    let mut hosts = Vec::new();
    let service = format!("raftmap-voter.{NS}.svc");
    for ordinal in 0..replicas {
        let id = 1 + ordinal as u64;
        net.add_node(id).unwrap();
        let ip = net.ip(id);
        hosts.push((format!("raftmap-voter-{ordinal}.{service}"), ip.clone()));
        hosts.push((service.clone(), ip.clone()));
        voter_ips.push(ip);
        let pvc = dir.join(format!("pvc/data-raftmap-voter-{ordinal}"));
        std::fs::create_dir_all(&pvc).unwrap();
        chown(&pvc, 0, fs_group, 0o2775);
    }
    let mut c = Cluster {
        podman: Podman::new(TEST_IMAGE),
        net,
        dir: dir.clone(),
        voters: voters.clone(),
        agents: agents.clone(),
        hosts,
        nodes,
        voter_ips,
        admin,
        running: BTreeMap::new(),
        next_agent: 0,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let vspec = voters.template.spec.clone();
    let aspec = agents.template.spec.clone();

    // 1. Three voters (podManagementPolicy: Parallel) found the cluster by themselves.
    let t = Instant::now();
    let voter_pods: Vec<Pod> = (0..replicas).map(|o| c.start_voter(o)).collect();
    for p in &voter_pods {
        c.wait_ready(p, &vspec);
    }
    note(
        "3 voters: start to all ready (bootstrap)",
        format!("{:.1?}", t.elapsed()),
    );
    let m = wait_members(&rt, &c, "three voters with their node names", |m| {
        m.len() == 3
            && m.iter()
                .all(|m| m.voter && node_names.contains(&m.node_name.as_str()))
    });
    let cluster_id = status(&rt, &c, &c.voter_ips[0].clone()).cluster_id;
    assert_eq!(cluster_id, NS, "the cluster is named after the CA");
    let mut voter_ids: Vec<u64> = m.iter().map(|m| m.node_id).collect();

    // 2. Two agents join with automatic ids and certificates signed for them.
    let t = Instant::now();
    let mut agent_pods = vec![c.start_agent(0), c.start_agent(1)];
    for p in &agent_pods {
        c.wait_ready(p, &aspec);
    }
    note(
        "2 agents: start to ready (enroll, join, reconcile)",
        format!("{:.1?}", t.elapsed()),
    );
    let mut agent_ids = Vec::new();
    for p in &agent_pods {
        let st = status(&rt, &c, &p.ip);
        assert_eq!(st.role, "learner");
        assert_eq!(st.node_name, p.node_name);
        assert!(!voter_ids.contains(&st.node_id));
        let w = &st.watched[0];
        assert_eq!(
            (w.map.as_str(), w.state.as_str()),
            ("conntrack", "synced"),
            "{w:?}"
        );
        note(
            &format!("capture backend on {}", p.node_name),
            w.backend.clone(),
        );
        agent_ids.push(st.node_id);
    }
    assert_ne!(agent_ids[0], agent_ids[1]);

    // A writer updates both hosts' maps; they converge to the same entries.
    let (a, b) = (c.nodes[0].map(), c.nodes[1].map());
    for i in 0..300u32 {
        let (m, tag) = if i % 2 == 0 { (&a, 0xa) } else { (&b, 0xb) };
        m.update(&key(tag, i), &value(i), UpdateFlags::Any).unwrap();
        if i % 7 == 0 && i > 10 {
            m.delete(&key(tag, i - 10)).unwrap();
        }
    }
    let entries = converged(&rt, &c, &[0, 1]);
    assert!(entries.len() > 200, "{}", entries.len());
    // Replication latency: a write to node a's map, seen in node b's.
    let mut lat = Vec::new();
    for i in 0..40u32 {
        let (k, v) = (key(0xc, i), value(i));
        let t = Instant::now();
        a.update(&k, &v, UpdateFlags::Any).unwrap();
        while b.lookup(&k).unwrap().as_deref() != Some(&v[..]) {
            assert!(t.elapsed() < T, "a write on kube-a did not reach kube-b");
            std::thread::sleep(Duration::from_micros(100));
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    note(
        "kernel map write on kube-a -> kube-b's kernel map",
        format!(
            "p50 {:.1?}, p99 {:.1?}, max {:.1?} (40 writes)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        ),
    );

    // 3. The agent on kube-a is replaced (a new pod, the same hostPath): the same member, and
    //    its map is never emptied nor loses an entry, while kube-b's writes keep coming.
    let before = a.entries().unwrap().len();
    let stop = Arc::new(AtomicBool::new(false));
    let fewest = Arc::new(AtomicUsize::new(usize::MAX));
    let sampler = {
        let (stop, fewest, pin) = (
            stop.clone(),
            fewest.clone(),
            c.nodes[0].bpffs.0.join(MAP_PIN),
        );
        std::thread::spawn(move || {
            let m = KernelMap::open_pinned(&pin).unwrap();
            while !stop.load(Ordering::Relaxed) {
                fewest.fetch_min(m.entries().unwrap().len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let writer = {
        let (stop, pin) = (stop.clone(), c.nodes[1].bpffs.0.join(MAP_PIN));
        std::thread::spawn(move || {
            let m = KernelMap::open_pinned(&pin).unwrap();
            let mut i = 1000u32;
            while !stop.load(Ordering::Relaxed) && i < 3000 {
                m.update(&key(0xb, i), &value(i), UpdateFlags::Any).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let t = Instant::now();
    let old = agent_pods[0].clone();
    let code = c.delete(&old);
    assert_eq!(code, 0, "an agent stops cleanly on SIGTERM");
    let stopped = t.elapsed();
    agent_pods[0] = c.start_agent(0);
    c.wait_ready(&agent_pods[0], &aspec);
    note(
        "agent replaced on kube-a: stop, new pod ready",
        format!("{stopped:.1?}, {:.1?}", t.elapsed()),
    );
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    writer.join().unwrap();
    assert_eq!(
        status(&rt, &c, &c.nodes[0].ip.clone()).node_id,
        agent_ids[0],
        "same hostPath, same id"
    );
    let fewest = fewest.load(Ordering::Relaxed);
    assert!(
        fewest >= before,
        "kube-a's map went down to {fewest} entries of {before} during the replacement"
    );
    converged(&rt, &c, &[0, 1]);

    // 4. A voter loses its volume: it comes back with a new id, joins, is promoted, and the
    //    id it replaced is removed; three voters again.
    let t = Instant::now();
    let wiped = voter_pods[2].clone();
    let old_id = status(&rt, &c, &wiped.ip).node_id;
    c.delete(&wiped);
    let pvc = dir.join("pvc/data-raftmap-voter-2");
    std::fs::remove_dir_all(&pvc).unwrap();
    std::fs::create_dir_all(&pvc).unwrap();
    chown(&pvc, 0, fs_group, 0o2775);
    c.start_voter(2);
    c.wait_ready(&wiped, &vspec);
    let new_id = status(&rt, &c, &wiped.ip).node_id;
    assert_ne!(new_id, old_id);
    let m = wait_members(
        &rt,
        &c,
        "the new voter promoted and the old id removed",
        |m| {
            m.iter().any(|m| m.node_id == new_id && m.voter)
                && !m.iter().any(|m| m.node_id == old_id)
        },
    );
    assert_eq!(m.iter().filter(|m| m.voter).count(), 3, "{m:?}");
    note(
        "voter volume wiped: new id promoted, old id removed",
        format!("{:.1?}", t.elapsed()),
    );
    voter_ids.retain(|id| *id != old_id);
    voter_ids.push(new_id);

    // 5. The agent on kube-b stops for longer than the reap limit: removed. Its host's map
    //    changes meanwhile; back on the same hostPath it finds itself removed, forgets its id
    //    and is restarted by the runtime as a new node that proposes what changed.
    let t = Instant::now();
    let away = agent_pods[1].clone();
    c.delete(&away);
    wait_members(&rt, &c, "the stopped agent removed", |m| {
        !m.is_empty() && !m.iter().any(|m| m.node_id == agent_ids[1])
    });
    note(
        &format!("agent stopped, removed (limit {REAP})"),
        format!("{:.1?}", t.elapsed()),
    );
    b.update(&key(0xd, 1), &value(1), UpdateFlags::Any).unwrap();
    b.delete(&key(0xb, 1001)).unwrap();
    let t = Instant::now();
    agent_pods[1] = c.start_agent(1);
    c.wait_ready(&agent_pods[1], &aspec);
    let back = status(&rt, &c, &c.nodes[1].ip.clone());
    assert_ne!(back.node_id, agent_ids[1]);
    let container = c.running[&agent_pods[1].name].clone();
    assert!(
        c.podman.restarts(&container) >= 1,
        "the runtime restarted it after it stopped"
    );
    let logs = c.podman.logs(&container);
    assert!(
        logs.contains(&format!(
            "node id {} was removed from this cluster and cannot be reused",
            agent_ids[1]
        )),
        "{logs}"
    );
    note(
        "removed agent back: start to ready as a new node",
        format!("{:.1?}", t.elapsed()),
    );
    agent_ids[1] = back.node_id;
    let entries = converged(&rt, &c, &[0, 1]);
    assert_eq!(
        entries.get(&key(0xd, 1)),
        Some(&value(1)),
        "the change made while away is kept"
    );
    assert!(
        !entries.contains_key(&key(0xb, 1001)),
        "the delete made while away is kept"
    );

    // 6. An agent without the seccomp exception (the runtime's default profile) is not ready,
    //    and its probe says why.
    let mut broken = aspec.clone();
    broken.containers[0].security_context.seccomp_profile = None;
    let pod = c.agent_pod(2);
    c.start(&pod, &broken);
    let (code, body) = wait_until("the misconfigured agent's readiness says why", T, || {
        let (code, body) = c.probe(&pod, &broken);
        (body.contains("the kernel refused bpf(2)"), (code, body))
    });
    assert_eq!(code, 503, "{body}");
    c.delete(&pod);

    // 7. A rolling restart of every container, voters from the highest ordinal down, then the
    //    agents one node at a time: writes are acknowledged throughout.
    let cl = client(&rt, &c.voter_endpoints(), &c.admin);
    rt.block_on(cl.declare(&MapSchema::hash("writes", 8, 8, 65536)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = api_writer(&rt, c.voter_endpoints(), c.admin.clone(), stop.clone());
    let mut steps = Vec::new();
    let t = Instant::now();
    for ordinal in (0..replicas).rev() {
        let pod = c.voter_pod(ordinal);
        let down = Instant::now();
        let code = c.delete(&pod);
        assert_eq!(code, 0, "a voter stops cleanly on SIGTERM");
        c.start_voter(ordinal);
        c.wait_ready(&pod, &vspec);
        steps.push((pod.name.clone(), down, Instant::now()));
    }
    for (node, pod) in agent_pods.iter_mut().enumerate() {
        let down = Instant::now();
        c.delete(pod);
        let old = std::mem::replace(pod, c.start_agent(node));
        c.wait_ready(pod, &aspec);
        steps.push((old.name, down, Instant::now()));
    }
    let rolled = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let acked = rt.block_on(writes).unwrap();
    for (pod, down, up) in &steps {
        let during = acked.iter().filter(|(at, _)| at > down && at < up).count();
        assert!(
            during > 0,
            "no write was acknowledged while {pod} restarted"
        );
    }
    let gaps = acked
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    note(
        "rolling restart of 3 voters and 2 agents",
        format!(
            "{rolled:.1?}; {} writes acknowledged, longest gap {gaps:.1?}",
            acked.len()
        ),
    );
    let (_, _, dump) = rt.block_on(cl.dump("writes", true)).unwrap();
    assert_eq!(dump.len(), acked.len(), "every acknowledged write is there");
    for (p, id) in agent_pods.iter().zip(&agent_ids) {
        assert_eq!(
            status(&rt, &c, &p.ip).node_id,
            *id,
            "{} kept its id",
            p.node_name
        );
    }
    a.update(&key(0xe, 1), &value(7), UpdateFlags::Any).unwrap();
    let entries = converged(&rt, &c, &[0, 1]);
    assert_eq!(entries.get(&key(0xe, 1)), Some(&value(7)));
    let m = members(&rt, &c);
    assert_eq!(m.iter().filter(|m| m.voter).count(), 3, "{m:?}");

    drop(c);
    figures.print();
}

/// What the run measured, printed as it goes and once more at the end.
#[derive(Default)]
struct Figures(Vec<(String, String)>);

impl Figures {
    fn note(&mut self, what: &str, value: String) {
        println!("{what}: {value}");
        self.0.push((what.into(), value));
    }

    fn print(&self) {
        println!("\nfigures:");
        for (what, value) in &self.0 {
            println!("  {what}: {value}");
        }
    }
}
