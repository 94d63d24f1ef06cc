//! The wire: protobuf <-> model conversions and message limits, for the client and the
//! services alike. (Functions rather than `From`/`TryFrom`: both types are foreign to this crate.)

use raftmap_proto as pb;
use raftmap_storage::{MapSchema, MapType, Op, ValidationError};

use std::net::SocketAddr;

use crate::error::{NodeError, Result};

/// Largest client request or response message.
pub(crate) const MAX_CLIENT_MESSAGE: usize = 16 * 1024 * 1024;

pub(crate) fn schema_from_pb(s: pb::MapSchema) -> Result<MapSchema, ValidationError> {
    let map_type = match pb::MapType::try_from(s.r#type) {
        Ok(pb::MapType::Hash) => MapType::Hash,
        Ok(pb::MapType::LruHash) => MapType::LruHash,
        Ok(pb::MapType::Array) => MapType::Array,
        _ => {
            return Err(ValidationError::UnknownMapType(format!(
                "enum value {}",
                s.r#type
            )))
        }
    };
    Ok(MapSchema {
        name: s.name,
        map_type,
        key_size: s.key_size,
        value_size: s.value_size,
        max_entries: s.max_entries,
    })
}

pub(crate) fn schema_to_pb(s: &MapSchema) -> pb::MapSchema {
    pb::MapSchema {
        name: s.name.clone(),
        r#type: match s.map_type {
            MapType::Hash => pb::MapType::Hash,
            MapType::LruHash => pb::MapType::LruHash,
            MapType::Array => pb::MapType::Array,
        } as i32,
        key_size: s.key_size,
        value_size: s.value_size,
        max_entries: s.max_entries,
    }
}

pub(crate) fn op_from_pb(op: pb::Op) -> Result<Op, NodeError> {
    use pb::op::Op as P;
    Ok(match op.op {
        Some(P::Declare(s)) => Op::DeclareMap(schema_from_pb(s)?),
        Some(P::Put(p)) => Op::Put {
            map: p.map,
            key: p.key,
            value: p.value,
        },
        Some(P::Delete(d)) => Op::Delete {
            map: d.map,
            key: d.key,
        },
        Some(P::Cas(c)) => Op::CompareAndSwap {
            map: c.map,
            key: c.key,
            expected: c.expected,
            new: c.new_value,
        },
        None => {
            return Err(NodeError::BadRequest(
                "operation without a kind (put, delete, cas, declare)".into(),
            ))
        }
    })
}

/// Parses `host:port` for listening.
pub fn parse_addr(addr: &str) -> Result<SocketAddr> {
    addr.parse()
        .map_err(|e| NodeError::BadRequest(format!("invalid address {addr:?}: {e}")))
}
