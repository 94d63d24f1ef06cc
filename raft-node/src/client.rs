//! A client of the `Kv` and `Admin` APIs over a list of endpoints, for the CLI, the demo and
//! tests. Any member serves any request: writes and admin calls are forwarded to the leader.

use raftmap_proto as pb;
use raftmap_proto::admin_client::AdminClient;
use raftmap_proto::kv_client::KvClient;
use raftmap_storage::MapSchema;
use tonic::transport::Channel;

use crate::error::{NodeError, Result};
use crate::tls::{Expect, Security};
use crate::wire::{schema_from_pb, schema_to_pb, MAX_CLIENT_MESSAGE};

/// Connected to the first reachable endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    channel: Channel,
}

impl Client {
    /// Connects to the first endpoint that accepts a connection, with the certificates of
    /// `security` (any node of the cluster may answer).
    pub async fn connect(endpoints: &[String], security: &Security) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(NodeError::BadRequest("no endpoints given".into()));
        }
        let mut errors = Vec::new();
        for addr in endpoints {
            match security.connect(addr, Expect::AnyNode).await {
                Ok(channel) => {
                    return Ok(Self {
                        addr: addr.clone(),
                        channel,
                    })
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let hint = if security.is_tls() {
            ""
        } else {
            " (if the cluster runs TLS, pass --tls-dir)"
        };
        Err(NodeError::Unavailable(format!(
            "cannot reach any endpoint ({}){hint}",
            errors.join("; ")
        )))
    }

    /// The endpoint in use.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_CLIENT_MESSAGE)
            .max_encoding_message_size(MAX_CLIENT_MESSAGE)
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// Writes a batch of operations atomically. A batch of only puts, deletes and
    /// declarations is idempotent, so it is retried (a few times, briefly) when the cluster is
    /// momentarily unavailable, as during a leader election; a batch with a compare-and-swap is
    /// not retried.
    pub async fn write(&self, ops: Vec<pb::op::Op>) -> Result<pb::WriteResponse> {
        let idempotent = ops.iter().all(|op| !matches!(op, pb::op::Op::Cas(_)));
        let req = pb::WriteRequest {
            ops: ops.into_iter().map(|op| pb::Op { op: Some(op) }).collect(),
        };
        let mut attempt = 0;
        loop {
            match self.kv().write(req.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if idempotent && s.code() == tonic::Code::Unavailable && attempt < 3 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    pub async fn declare(&self, schema: &MapSchema) -> Result<pb::WriteResponse> {
        self.write(vec![pb::op::Op::Declare(schema_to_pb(schema))])
            .await
    }

    pub async fn put(&self, map: &str, key: Vec<u8>, value: Vec<u8>) -> Result<pb::WriteResponse> {
        self.write(vec![put(map, key, value)]).await
    }

    pub async fn delete(&self, map: &str, key: Vec<u8>) -> Result<pb::WriteResponse> {
        self.write(vec![pb::op::Op::Delete(pb::Delete {
            map: map.into(),
            key,
        })])
        .await
    }

    /// Reads one key; `linearizable` waits for read-index, otherwise this node's applied state.
    pub async fn get(
        &self,
        map: &str,
        key: Vec<u8>,
        linearizable: bool,
    ) -> Result<Option<Vec<u8>>> {
        let r = self
            .kv()
            .get(pb::GetRequest {
                map: map.into(),
                key,
                consistency: consistency(linearizable),
            })
            .await?
            .into_inner();
        Ok(r.found.then_some(r.value))
    }

    /// Every entry of a map, in key order, with its schema and the applied index of the read.
    pub async fn dump(
        &self,
        map: &str,
        linearizable: bool,
    ) -> Result<(MapSchema, u64, Vec<(Vec<u8>, Vec<u8>)>)> {
        let mut stream = self
            .kv()
            .dump(pb::DumpRequest {
                map: map.into(),
                consistency: consistency(linearizable),
                page_size: 0,
            })
            .await?
            .into_inner();
        let mut schema = None;
        let mut index = 0;
        let mut out = Vec::new();
        while let Some(page) = stream.message().await? {
            if let Some(s) = page.schema {
                schema = Some(schema_from_pb(s)?);
            }
            index = page.index;
            out.extend(page.entries.into_iter().map(|e| (e.key, e.value)));
        }
        let schema = schema.ok_or_else(|| NodeError::Internal("dump carried no schema".into()))?;
        Ok((schema, index, out))
    }

    pub async fn status(&self) -> Result<pb::StatusResponse> {
        Ok(self
            .admin()
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }

    pub async fn members(&self) -> Result<pb::MembersResponse> {
        Ok(self
            .admin()
            .members(pb::MembersRequest {})
            .await?
            .into_inner())
    }
}

/// A put operation.
pub fn put(map: &str, key: Vec<u8>, value: Vec<u8>) -> pb::op::Op {
    pb::op::Op::Put(pb::Put {
        map: map.into(),
        key,
        value,
    })
}

fn consistency(linearizable: bool) -> i32 {
    if linearizable {
        pb::Consistency::Linearizable as i32
    } else {
        pb::Consistency::Local as i32
    }
}

pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
