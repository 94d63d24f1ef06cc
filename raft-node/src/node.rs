//! A running raftmap node: storage, openraft, group commit, gRPC servers, metrics, joining.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{ServerState, SnapshotPolicy};
use raftmap_proto::admin_server::AdminServer;
use raftmap_proto::kv_server::KvServer;
use raftmap_proto::peer_server::PeerServer;
use raftmap_storage::{NodeId, NodeInfo, Raft, StoreOptions};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::autopilot::Silence;
use crate::error::{NodeError, Result};
use crate::identity::{self, NodeIdSetting};
use crate::join::join_cluster;
use crate::kernel::{CaptureBackend, CaptureSettings, KernelSync, WatchSpec};
use crate::metrics::Metrics;
use crate::network::{Network, MAX_PEER_MESSAGE};
use crate::pool::{ClusterId, PeerPool};
use crate::propose::{BatchConfig, Batcher, Proposer};
use crate::provision::Provision;
use crate::service::{AdminService, AuthzLayer, KvService, PeerService, Port};
use crate::shared::NodeShared;
use crate::tls::{Principal, Security};
use crate::wire::MAX_CLIENT_MESSAGE;

/// Everything needed to start a node. Fields mirror `raftmap agent`'s flags and its `--config`
/// file (TOML, same names with underscores).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Required for a new data dir (a number, or `auto`); afterwards read from it.
    pub node_id: Option<NodeIdSetting>,
    /// The host this node runs on (a Kubernetes node name), recorded with its membership.
    pub node_name: Option<String>,
    /// Peer (Raft) listen and advertised address.
    pub raft_addr: String,
    /// Client and admin API listen and advertised address.
    pub api_addr: String,
    /// The peer address other nodes dial, when it is not `raft_addr` (a name that stays when
    /// the IP changes, as a StatefulSet pod's `voter-0.voters.ns.svc:7400`).
    pub advertise_raft_addr: Option<String>,
    /// The API address other nodes and clients are told, when it is not `api_addr`.
    pub advertise_api_addr: Option<String>,
    /// Prometheus `/metrics`, `/healthz`, `/readyz`; off when empty.
    pub metrics_addr: Option<String>,
    pub data_dir: PathBuf,
    /// API addresses of members (comma-separated; a DNS name may stand for several): join
    /// their cluster on first start, trying them in turn until one answers.
    pub join: Option<String>,
    /// When joining, stay a learner instead of asking to become a voter.
    pub learner: bool,
    /// Voters only: found the cluster once this many fresh voters among `join` see each other
    /// (every address answering); join it instead when one of them is already a member.
    pub bootstrap_expect: Option<usize>,
    /// fsync the log before acknowledging writes.
    pub sync: bool,
    /// Build a snapshot (and purge the log) every this many entries.
    pub snapshot_logs: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// Kernel maps to keep in sync (`[[watch]]` tables in the config file).
    pub watch: Vec<WatchSpec>,
    /// How often each watched kernel map is scanned for changes.
    pub scan_interval_ms: u64,
    /// Which capture backend to use (`auto`: the best the kernel allows).
    pub capture_backend: CaptureBackend,
    /// Whether watched maps are diffed every `scan_interval_ms` (always in production; off only
    /// in tests that prove the fexit backend captures every change by itself; a config file
    /// cannot turn it off).
    #[serde(skip)]
    pub periodic_scan: bool,
    /// Most watch streams this node serves at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
    /// Largest snapshot this node accepts from a leader (bytes).
    pub max_snapshot_bytes: u64,
    /// Free bytes the data dir's filesystem must keep; a write that finds less stops the node.
    pub min_free_disk_bytes: u64,
    /// How often the leader compares the replicas' state digests.
    pub consistency_check_ms: u64,
    /// How often a node reads its whole state back from disk to check it.
    pub disk_check_ms: u64,
    /// UNSAFE, for testing the fault-injection harness: serve linearizable reads from the local
    /// state without read-index.
    pub unsafe_local_reads: bool,
    /// Identity directory (`ca.crt`, `tls.crt`, `tls.key`): mutual TLS on the peer and API
    /// ports, reloaded when the files change.
    pub tls_dir: Option<PathBuf>,
    /// The cluster CA (`ca.crt` and `ca.key`, or a cert-manager CA Secret): the node issues
    /// its own certificate into `<data_dir>/tls` and signs those of new nodes.
    pub ca_dir: Option<PathBuf>,
    /// An enrollment credential (`raftmap certs enroll`): the node has its certificate signed
    /// by a `join` member that holds the CA key, into `<data_dir>/tls`.
    pub enroll_dir: Option<PathBuf>,
    /// Listen without TLS on addresses other than loopback.
    pub insecure: bool,
    /// As leader: remove a learner not heard from for this long (`0`: never).
    pub reap_learners_after: Silence,
    /// As leader, while there are more voters than `bootstrap_expect` (a replacement was
    /// promoted): remove a voter not heard from for this long (`0`: never).
    pub reap_voters_after: Silence,
    #[serde(skip)]
    pub batch: BatchConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            node_name: None,
            raft_addr: "127.0.0.1:7400".into(),
            api_addr: "127.0.0.1:7401".into(),
            advertise_raft_addr: None,
            advertise_api_addr: None,
            metrics_addr: None,
            data_dir: PathBuf::from("raftmap-data"),
            join: None,
            learner: false,
            bootstrap_expect: None,
            sync: true,
            snapshot_logs: 10_000,
            heartbeat_ms: 100,
            election_timeout_ms: 500,
            watch: Vec::new(),
            scan_interval_ms: 100,
            periodic_scan: true,
            capture_backend: CaptureBackend::Auto,
            max_watchers: 256,
            max_snapshot_bytes: 4 << 30,
            min_free_disk_bytes: raftmap_storage::DEFAULT_MIN_FREE_BYTES,
            consistency_check_ms: 10_000,
            disk_check_ms: 600_000,
            unsafe_local_reads: false,
            tls_dir: None,
            ca_dir: None,
            enroll_dir: None,
            insecure: false,
            reap_learners_after: Silence(Duration::from_secs(30 * 60)),
            reap_voters_after: Silence(Duration::from_secs(60)),
            batch: BatchConfig::default(),
        }
    }
}

impl NodeConfig {
    /// Why this configuration would expose a node without TLS: it listens beyond loopback with
    /// no `tls_dir`, and `insecure` was not asked for.
    pub fn insecure_exposure(&self) -> Option<String> {
        if self.tls_dir.is_some()
            || self.ca_dir.is_some()
            || self.enroll_dir.is_some()
            || self.insecure
        {
            return None;
        }
        let exposed = [("raft", &self.raft_addr), ("api", &self.api_addr)]
            .into_iter()
            .find(|(_, a)| !is_loopback(a))?;
        Some(format!(
            "refusing to serve the {} address {} without TLS: pass --tls-dir (certificates from `raftmap certs`), or --insecure to accept that anyone who reaches it can write every node's maps",
            exposed.0, exposed.1
        ))
    }

    /// Where the node's certificate comes from when it obtains it itself.
    fn provision(&self) -> Result<Option<Provision>> {
        match (&self.tls_dir, &self.ca_dir, &self.enroll_dir) {
            (_, Some(_), Some(_)) => Err(NodeError::BadRequest(
                "--ca-dir and --enroll-dir both given: a node with the CA key issues its own certificate".into(),
            )),
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(NodeError::BadRequest(
                "--tls-dir with --ca-dir or --enroll-dir: a node that obtains its certificate keeps it in <data dir>/tls".into(),
            )),
            (_, Some(ca), None) => Ok(Some(Provision::Ca(ca.clone()))),
            (_, None, Some(e)) => Ok(Some(Provision::Enroll(e.clone()))),
            (_, None, None) => Ok(None),
        }
    }

    /// The node's certificates: from `tls_dir`, or none.
    fn security(&self) -> Result<Security> {
        match &self.tls_dir {
            Some(dir) => Ok(Security::from_dir(dir)?),
            None => Ok(Security::insecure()),
        }
    }
}

/// Whether `addr` (`host:port`) is on loopback; a name other than `localhost` is not.
fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How long a stopping leader waits for its successor (the agent gives shutdown 5 s).
const STOP_HANDOVER: std::time::Duration = std::time::Duration::from_secs(3);

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
#[derive(Debug)]
pub struct RunningNode {
    pub shared: Arc<NodeShared>,
    shutdown: watch::Sender<bool>,
    fatal: watch::Receiver<Option<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Opens the data dir, starts Raft and every server, and (with `join`) joins the cluster.
    pub async fn start(cfg: NodeConfig) -> Result<Self> {
        if let Some(join) = &cfg.join {
            crate::join::join_addresses(join)?;
        }
        match (cfg.bootstrap_expect, &cfg.join) {
            (Some(0), _) => {
                return Err(NodeError::BadRequest(
                    "--bootstrap-expect 0: the cluster needs at least one voter".into(),
                ))
            }
            (Some(_), None) => {
                return Err(NodeError::BadRequest(
                    "--bootstrap-expect needs --join: the addresses of the voters that found the cluster together".into(),
                ))
            }
            (Some(_), Some(_)) if cfg.learner => {
                return Err(NodeError::BadRequest(
                    "--bootstrap-expect is for voters; a --learner joins an existing cluster".into(),
                ))
            }
            _ => {}
        }
        if let Some(n) = &cfg.node_name {
            crate::wire::check_node_name(n)?;
        }
        let provision = cfg.provision()?;
        // The id a certificate names wins over --node-id auto; a fixed --node-id must match it.
        let requested = |cert_id: Option<NodeId>| match (cfg.node_id, cert_id) {
            (Some(NodeIdSetting::Fixed(n)), _) => Some(NodeIdSetting::Fixed(n)),
            (_, Some(c)) => Some(NodeIdSetting::Fixed(c)),
            (auto, None) => auto,
        };
        let (security, ident, fresh) = match &provision {
            // The node makes or asks for its certificate: its id comes first.
            Some(p) => {
                let dir = Provision::tls_dir(&cfg.data_dir);
                let (ident, fresh) = identity::load_or_create(
                    &cfg.data_dir,
                    requested(Provision::existing_id(&dir)),
                )?;
                p.ensure(&dir, ident.node_id, cfg.join.as_deref()).await?;
                (Security::from_dir(&dir)?, ident, fresh)
            }
            None => {
                let security = cfg.security()?;
                // A node certificate names the node: it gives a new data dir its id.
                let cert = security.identity();
                let cert_id = cert.as_ref().and_then(Principal::node_id);
                if security.is_tls() && cert_id.is_none() {
                    return Err(NodeError::BadRequest(format!(
                        "{} holds no node certificate ({}); a node needs one (`raftmap certs node`, or --ca-dir / --enroll-dir to obtain one)",
                        security.dir().unwrap_or(std::path::Path::new("")).display(),
                        cert.map_or_else(|| "only a CA".to_string(), |c| c.to_string())
                    )));
                }
                let (ident, fresh) = identity::load_or_create(&cfg.data_dir, requested(cert_id))?;
                (security, ident, fresh)
            }
        };
        let cert = security.identity();
        let cert_id = cert.as_ref().and_then(Principal::node_id);
        let id = ident.node_id;
        if let Some(c) = cert_id.filter(|c| *c != id) {
            return Err(NodeError::BadRequest(format!(
                "the certificate is node {c}'s, this data dir is node {id}'s: give this node its own certificate"
            )));
        }
        let kernel = KernelSync::new(id, &cfg.watch, &cfg.data_dir)?;
        let hook: Option<Arc<dyn raftmap_storage::ApplyHook>> =
            (!cfg.watch.is_empty()).then(|| kernel.clone() as Arc<dyn raftmap_storage::ApplyHook>);
        let (log, sm, view) = raftmap_storage::open(
            &cfg.data_dir,
            StoreOptions {
                sync: cfg.sync,
                min_free_bytes: cfg.min_free_disk_bytes,
            },
            hook,
        )?;
        if fresh {
            ident.persist(&cfg.data_dir)?;
        }
        kernel.set_base(&view)?;
        if let (Some(ours), Some(cert)) = (view.cluster().cluster_id, &cert) {
            if ours != cert.cluster {
                return Err(NodeError::BadRequest(format!(
                    "this data dir belongs to cluster {ours}, the certificate is for cluster {}",
                    cert.cluster
                )));
            }
        }
        let info = NodeInfo {
            raft_addr: cfg
                .advertise_raft_addr
                .clone()
                .unwrap_or_else(|| cfg.raft_addr.clone()),
            api_addr: cfg
                .advertise_api_addr
                .clone()
                .unwrap_or_else(|| cfg.api_addr.clone()),
        };
        crate::wire::check_member_addr(&info.raft_addr)?;
        crate::wire::check_member_addr(&info.api_addr)?;

        let raft_config = openraft::Config {
            cluster_name: "raftmap".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            // openraft makes the upper bound the leader's lease too: a follower waits for the
            // lease and then its own random timeout, 2.5-3 T here (3-4 T with [T, 2T]). A
            // quarter-second spread still dwarfs a vote's round trip.
            election_timeout_min: cfg.election_timeout_ms,
            election_timeout_max: cfg.election_timeout_ms * 3 / 2,
            // A candidate first asks whether it could win; one whose log lags (a restarted
            // node) learns it cannot without raising the term and voiding a better
            // candidate's election.
            enable_pre_vote: Some(true),
            broadcast_submitted_on_append: Some(true),
            install_snapshot_timeout: 10_000,
            max_payload_entries: 64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.snapshot_logs.min(1000),
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::BadRequest(format!("raft configuration: {e}")))?;

        // Bind first, so that an address in use is reported before anything else starts.
        let raft_listener = bind(&cfg.raft_addr, "raft").await?;
        let api_listener = bind(&cfg.api_addr, "api").await?;
        let metrics_listener = match &cfg.metrics_addr {
            Some(a) if !a.is_empty() => Some(bind(a, "metrics").await?),
            _ => None,
        };

        let cluster = Arc::new(ClusterId::new(view.clone(), security.clone()));
        let pool = PeerPool::new(security.clone(), id, cluster);
        let network = Network { pool: pool.clone() };
        let raft = Raft::new(id, Arc::new(raft_config), network, log.clone(), sm).await?;
        let metrics = Metrics::new(|r| kernel.metrics.register(r));
        let proposer = Proposer {
            raft: raft.clone(),
            id,
            pool,
            metrics: metrics.clone(),
        };
        let batcher = Batcher::start(proposer.clone(), cfg.batch);
        kernel.start(
            view.clone(),
            batcher.clone(),
            CaptureSettings {
                backend: cfg.capture_backend,
                interval: Duration::from_millis(cfg.scan_interval_ms.max(1)),
                periodic_scan: cfg.periodic_scan,
            },
        )?;
        let (fatal_tx, fatal) = watch::channel(None);
        let shared = Arc::new(NodeShared {
            fatal: fatal_tx,
            id,
            info,
            node_name: cfg.node_name.clone().filter(|n| !n.is_empty()),
            auto_id: cfg.node_id == Some(NodeIdSetting::Auto),
            ca_dir: match &provision {
                Some(Provision::Ca(d)) => Some(d.clone()),
                _ => None,
            },
            raft,
            view,
            log,
            proposer,
            batcher,
            metrics,
            kernel,
            watchers: Arc::new(tokio::sync::Semaphore::new(cfg.max_watchers)),
            max_watchers: cfg.max_watchers,
            data_dir: cfg.data_dir.clone(),
            max_snapshot_bytes: cfg.max_snapshot_bytes,
            receiving_snapshot: tokio::sync::Mutex::new(()),
            corrupt: std::sync::Mutex::new(None),
            disk_corrupt: std::sync::atomic::AtomicBool::new(false),
            confirmed: std::sync::Mutex::new(Default::default()),
            unknown: std::sync::Mutex::new(BTreeMap::new()),
            unsafe_local_reads: cfg.unsafe_local_reads,
            security: security.clone(),
            heard: Default::default(),
            ready_silence: crate::shared::ready_silence(Duration::from_millis(cfg.heartbeat_ms)),
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let peer = PeerServer::new(PeerService::new(shared.clone()))
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        let authz = |port| AuthzLayer {
            shared: shared.clone(),
            port,
        };
        tasks.push(serve(
            server_builder().layer(authz(Port::Peer)).add_service(peer),
            crate::tls::incoming(raft_listener, security.clone()),
            shutdown_rx.clone(),
        ));
        let kv = KvServer::new(KvService::new(shared.clone()))
            .max_decoding_message_size(MAX_CLIENT_MESSAGE)
            .max_encoding_message_size(MAX_CLIENT_MESSAGE);
        let admin = AdminServer::new(AdminService::new(shared.clone()));
        tasks.push(serve(
            server_builder()
                .layer(authz(Port::Api))
                .add_service(kv)
                .add_service(admin),
            crate::tls::incoming(api_listener, security.clone()),
            shutdown_rx.clone(),
        ));

        if let Some(l) = metrics_listener {
            tasks.push(tokio::spawn(crate::http::serve(
                shared.clone(),
                l,
                shutdown_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(update_metrics(shared.clone())));
        if security.is_tls() {
            tasks.push(tokio::spawn(reload_certs(shared.clone())));
        }
        if let Some(p) = provision {
            tasks.push(tokio::spawn(crate::provision::maintain(
                shared.clone(),
                p,
                cfg.join.clone(),
            )));
        }
        tasks.push(tokio::spawn(crate::consistency::run(
            shared.clone(),
            Duration::from_millis(cfg.consistency_check_ms.max(100)),
            Duration::from_millis(cfg.disk_check_ms.max(100)),
        )));
        if shared.node_name.is_some() {
            tasks.push(tokio::spawn(record_name(shared.clone())));
        }
        tasks.push(tokio::spawn(crate::autopilot::run(
            shared.clone(),
            crate::autopilot::Policy {
                learners_after: cfg.reap_learners_after.limit(),
                voters: cfg.bootstrap_expect,
                voters_after: cfg.reap_voters_after.limit(),
            },
        )));
        if let Some(join) = cfg.join.clone() {
            let s = shared.clone();
            let learner = cfg.learner;
            let expect = cfg.bootstrap_expect;
            tasks.push(tokio::spawn(async move {
                let res = match expect {
                    Some(n) => crate::bootstrap::bootstrap_expect(&s, &join, n).await,
                    None => join_cluster(&s, &join, learner).await,
                };
                if let Err(e) = res {
                    tracing::error!(error = %e, "joining the cluster failed");
                    s.fatal
                        .send_replace(Some(format!("joining the cluster through {join}: {e}")));
                    return;
                }
                let e = crate::join::watch_removal(&s, &join, learner).await;
                tracing::error!(error = %e, "stopping");
                s.fatal.send_replace(Some(e.to_string()));
            }));
        }
        tracing::info!(node = id, raft = %cfg.raft_addr, api = %cfg.api_addr, data_dir = %cfg.data_dir.display(), "raftmap node started");
        Ok(Self {
            shared,
            shutdown,
            fatal,
            tasks,
        })
    }

    /// Waits until the node fails fatally (the error is returned) or `stop` resolves.
    pub async fn run_until(&mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = stop => Ok(()),
            r = self.fatal.wait_for(Option::is_some) => match r {
                Ok(msg) => Err(NodeError::FailedPrecondition(msg.clone().unwrap_or_default())),
                Err(_) => Ok(()),
            },
        }
    }

    /// Stops the servers and Raft. A leader first hands its leadership to another voter (up
    /// to `STOP_HANDOVER`), so that a rolling restart costs the cluster no election timeout;
    /// nothing leaves the membership.
    pub async fn shutdown(self) {
        let leads = self
            .shared
            .raft
            .metrics()
            .borrow_watched()
            .state
            .is_leader();
        if leads {
            match self.shared.hand_over_leadership(STOP_HANDOVER).await {
                Ok(to) => tracing::info!(to, "handed leadership on before stopping"),
                Err(e) => {
                    tracing::warn!(error = %e, "stopping as leader: could not hand leadership on")
                }
            }
        }
        self.shutdown.send_replace(true);
        let _ = self.shared.raft.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Records this node's name with its membership once it is a member and there is a leader,
/// and again whenever the name recorded differs (a voter whose volume moved to another host).
async fn record_name(shared: Arc<NodeShared>) {
    let Some(name) = shared.node_name.clone() else {
        return;
    };
    let mut metrics = shared.raft.metrics();
    loop {
        let member = {
            let m = metrics.borrow_watched();
            m.current_leader.is_some()
                && m.membership_config
                    .membership()
                    .get_node(&shared.id)
                    .is_some()
        };
        if member && shared.view.cluster().names.get(&shared.id) != Some(&name) {
            let proposal = raftmap_storage::Proposal {
                batches: vec![],
                admin: vec![raftmap_storage::AdminOp::NameNode {
                    node_id: shared.id,
                    name: name.clone(),
                }],
            };
            match shared.proposer.propose(proposal).await {
                Ok(_) => {
                    tracing::info!(name = %name, "recorded this node's name with its membership")
                }
                Err(e) => tracing::debug!(error = %e, "recording this node's name; retrying"),
            }
        }
        // A change of leader or membership, or a second, whichever comes first.
        let _ = tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await;
    }
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::BadRequest(format!("cannot listen on {what} address {addr}: {e}")))
}

/// Most streams (calls in flight, watches) one connection may hold open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// A gRPC server with raftmap's limits: connections whose peer stops answering HTTP/2 pings
/// (a frozen process, a vanished host) are closed within half a minute, and one connection holds
/// a bounded number of streams. Message sizes are bounded per service.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // Calls a client times out and resets before they were accepted (to a node that was
        // paused, say) do not count against the connection as an attack.
        .http2_max_pending_accept_reset_streams(Some(MAX_STREAMS_PER_CONNECTION as usize))
}

/// How often the certificate files are looked at for a change.
const CERT_RELOAD: Duration = Duration::from_secs(1);

fn serve<L>(
    router: tonic::transport::server::Router<L>,
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::tls::Conn>>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()>
where
    L: tower::Layer<tonic::service::Routes> + Send + 'static,
    L::Service: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    })
}

/// Reloads the certificates when their files change (a rotated Secret) and keeps their
/// metrics current.
async fn reload_certs(shared: Arc<NodeShared>) {
    let mut last_error = String::new();
    loop {
        if shared.security.reload_logged(&mut last_error) {
            shared.metrics.cert_reloads.inc();
        }
        if let Some((cert, ca)) = shared.security.expiry() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for (which, at) in [("tls", cert), ("ca", ca)] {
                shared
                    .metrics
                    .cert_expiry
                    .get_or_create(&vec![("cert".to_string(), which.to_string())])
                    .set(at.saturating_sub(now));
            }
        }
        tokio::time::sleep(CERT_RELOAD).await;
    }
}

async fn update_metrics(shared: Arc<NodeShared>) {
    let mut rx = shared.raft.metrics();
    loop {
        {
            let m = rx.borrow_and_update();
            if let Err(e) = &m.running_state {
                let reason = format!("the Raft core of node {} stopped: {e}", shared.id);
                tracing::error!("{reason}");
                shared.fatal.send_replace(Some(reason));
                return;
            }
            let g = &shared.metrics;
            g.is_leader.set(i64::from(m.state == ServerState::Leader));
            g.term.set(m.current_term as i64);
            g.last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
            g.applied_index
                .set(m.last_applied.map_or(0, |l| l.index) as i64);
            g.committed_index
                .set(shared.log.committed_index().unwrap_or(0) as i64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
