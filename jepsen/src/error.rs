//! Errors that stop a run (anomalies are not errors: they are results).

/// Errors that stop a run (not anomalies: those are results).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cluster: {0}")]
    Cluster(#[from] raftmap_node::NodeError),
    #[error("cluster: {0}")]
    Harness(#[from] crate::cluster::HarnessError),
    #[error("cluster: {0}")]
    Launch(#[from] crate::cluster::LaunchError),
    #[error("history: {0}")]
    History(#[from] crate::history::HistoryError),
    #[error("kernel map: {0}")]
    Kernel(#[from] raftmap_ebpf_hooks::HookError),
    #[error("{0}")]
    Config(String),
    #[error("{error}\nthe end of each node's log:\n{logs}")]
    Aborted { error: Box<RunError>, logs: String },
}
