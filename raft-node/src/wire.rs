//! The wire: protobuf <-> model conversions and message limits, for the client and the
//! services alike. (Functions rather than `From`/`TryFrom`: both types are foreign to this crate.)

use raftmap_proto as pb;
use raftmap_storage::{MapSchema, MapType, Op, ValidationError};

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

/// A node name as a member may record it: a host or Kubernetes node name (at most 253 bytes of
/// letters, digits, `-`, `.` and `_`).
pub fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= raftmap_storage::MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NodeError::BadRequest(format!(
            "node name {name:?}: expected 1 to {} letters, digits, '-', '.' or '_' (a host name)",
            raftmap_storage::MAX_NODE_NAME
        )))
    }
}

/// A member's advertised address: `host:port`, the host an IP address or a DNS name (a
/// StatefulSet pod's stable name, say).
pub fn check_member_addr(addr: &str) -> Result<()> {
    let bad = |why: &str| NodeError::BadRequest(format!("invalid address {addr:?}: {why}"));
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = ip.parse::<std::net::IpAddr>() {
        if ip.is_unspecified() {
            // Every node listening on all interfaces would share it, and no peer can dial it.
            return Err(bad(
                "an unspecified address is where a node listens, not where peers reach it: advertise one (--advertise-raft-addr, --advertise-api-addr)",
            ));
        }
        return Ok(());
    }
    let dns = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if dns {
        Ok(())
    } else {
        Err(bad("the host is neither an IP address nor a DNS name"))
    }
}

#[cfg(test)]
mod member_addr_tests {
    use super::*;

    #[test]
    fn member_addresses_are_ips_or_dns_names_with_a_port() {
        for ok in [
            "10.0.0.1:7400",
            "[fd00::1]:7400",
            "raftmap-voter-0.raftmap-voter.raftmap.svc:7400",
            "localhost:1",
        ] {
            check_member_addr(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("10.0.0.1", "host:port"),
            ("host:0", "port"),
            ("host:http", "port"),
            (":7400", "neither"),
            ("a..b:1", "neither"),
            ("-a.b:1", "neither"),
            ("a b:1", "neither"),
            ("0.0.0.0:7400", "advertise"),
            ("[::]:7400", "advertise"),
        ] {
            let e = check_member_addr(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
