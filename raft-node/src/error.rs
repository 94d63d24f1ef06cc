//! Errors of the node crate and their mapping onto gRPC status codes.

use std::path::PathBuf;

use raftmap_storage::{NodeId, StorageError, TypeConfig, ValidationError};
use serde::{Deserialize, Serialize};

/// Everything that can go wrong serving a request or running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request is malformed or does not match the map's schema. Nothing was written.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    /// The cluster is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No leader is known, or it cannot be reached. The request may be retried.
    #[error("{0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The data dir cannot be used as it is; nothing was changed in it.
    #[error("data dir: {problem}")]
    DataDir { dir: PathBuf, problem: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Kernel(#[from] raftmap_ebpf_hooks::HookError),
    #[error("raft: {0}")]
    Raft(#[from] openraft::error::Fatal<TypeConfig>),
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: EncodeError,
    },
    /// A peer sent bytes that do not decode; nothing was done with them.
    #[error("malformed peer message: {0}")]
    MalformedPeerMessage(#[source] postcard::Error),
    /// Another node answered with a status that has no meaning of its own here.
    #[error("{code:?}: {message}")]
    Remote { code: tonic::Code, message: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Internal(String),
}

/// What failed to encode.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        let msg = e.to_string();
        match e {
            NodeError::Invalid(_)
            | NodeError::BadRequest(_)
            | NodeError::MalformedPeerMessage(_) => tonic::Status::invalid_argument(msg),
            NodeError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            NodeError::NotFound(_) => tonic::Status::not_found(msg),
            NodeError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            NodeError::Unavailable(_) => tonic::Status::unavailable(msg),
            NodeError::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            NodeError::Remote { code, message } => tonic::Status::new(code, message),
            NodeError::DataDir { .. }
            | NodeError::Storage(_)
            | NodeError::Kernel(_)
            | NodeError::Raft(_)
            | NodeError::Encode { .. }
            | NodeError::Tls(_)
            | NodeError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<tonic::Status> for NodeError {
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            tonic::Code::InvalidArgument => NodeError::BadRequest(msg),
            tonic::Code::AlreadyExists => NodeError::AlreadyExists(msg),
            tonic::Code::NotFound => NodeError::NotFound(msg),
            tonic::Code::FailedPrecondition => NodeError::FailedPrecondition(msg),
            tonic::Code::Unavailable => NodeError::Unavailable(msg),
            tonic::Code::DeadlineExceeded => NodeError::Timeout(msg),
            code => NodeError::Remote { code, message: msg },
        }
    }
}

/// Why a forwarded proposal was not appended, as the leader reports it over the peer protocol.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// The receiver is not the leader; the entry was not appended, so retrying is safe.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("{0}")]
    Failed(String),
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| NodeError::Encode {
        what: "peer message",
        source: e.into(),
    })
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(NodeError::MalformedPeerMessage)
}
