//! The operator commands: cluster init, membership, status, and the map commands.

use anyhow::{bail, Result};
use raftmap_node::proto as pb;
use raftmap_node::storage::MapSchema;
use serde_json::json;

use crate::cli::{parse_hex, Conn, MapCmd, Output};
use crate::table::status_table;

pub(crate) fn from_status(s: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(raftmap_node::NodeError::from(s))
}

pub(crate) fn print(output: Output, j: serde_json::Value, table: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{j}"),
        Output::Table => println!("{}", table()),
    }
}

pub(crate) fn print_members(output: Output, r: &pb::MembersResponse) {
    let role = |m: &pb::Member| if m.voter { "voter" } else { "learner" };
    let leads = |m: &pb::Member| r.has_leader && r.leader_id == m.node_id;
    let rows: Vec<_> = r
        .members
        .iter()
        .map(|m| {
            json!({"node_id": m.node_id, "name": m.node_name, "raft_addr": m.raft_addr,
                   "api_addr": m.api_addr, "role": role(m), "leader": leads(m)})
        })
        .collect();
    print(
        output,
        json!({"cluster_id": r.cluster_id, "members": rows}),
        || {
            let head = ["ID", "NAME", "ROLE", "LEADER", "RAFT", "API"].map(String::from);
            crate::table::columns(
                std::iter::once(head.to_vec()).chain(r.members.iter().map(|m| {
                    vec![
                        m.node_id.to_string(),
                        if m.node_name.is_empty() {
                            "-".into()
                        } else {
                            m.node_name.clone()
                        },
                        role(m).into(),
                        if leads(m) { "*" } else { "" }.into(),
                        m.raft_addr.clone(),
                        m.api_addr.clone(),
                    ]
                })),
            )
        },
    );
}

/// Status of every endpoint (each answers for itself).
pub(crate) async fn status(conn: &Conn) -> Result<()> {
    let mut rows = Vec::new();
    let mut failures = 0;
    // A certificate that cannot be used fails every endpoint alike: say so once.
    conn.security()?;
    for ep in &conn.endpoints {
        let res = async {
            let c = conn.client_of(ep).await?;
            Ok::<_, anyhow::Error>(c.status().await?)
        }
        .await;
        match res {
            Ok(s) => rows.push((ep.clone(), Ok(s))),
            Err(e) => {
                failures += 1;
                rows.push((ep.clone(), Err(e.to_string())));
            }
        }
    }
    let j: Vec<_> = rows
        .iter()
        .map(|(ep, r)| match r {
            Ok(s) => json!({"endpoint": ep, "node_id": s.node_id, "cluster_id": s.cluster_id, "role": s.role,
                "leader_id": s.has_leader.then_some(s.leader_id), "term": s.term,
                "last_log_index": s.last_log_index, "committed_index": s.committed_index,
                "applied_index": s.applied_index, "snapshot_index": s.snapshot_index,
                "purged_index": s.purged_index, "ready": s.ready,
                "not_ready_reason": (!s.not_ready_reason.is_empty()).then_some(&s.not_ready_reason),
                "corrupt": (!s.corrupt.is_empty()).then_some(&s.corrupt),
                "tls": s.tls.as_ref().map(|t| json!({"identity": t.identity,
                    "expires_unix": t.expires_unix, "ca_expires_unix": t.ca_expires_unix})),
                "watched": s.watched.iter().map(|w| json!({"map": w.map, "location": w.location,
                    "backend": w.backend, "entries": w.entries, "state": w.state,
                    "refused_changes": w.refused_changes,
                    "last_refusal": (!w.last_refusal.is_empty()).then_some(&w.last_refusal)})).collect::<Vec<_>>()}),
            Err(e) => json!({"endpoint": ep, "error": e}),
        })
        .collect();
    print(conn.output, json!(j), || status_table(&rows));
    if failures == rows.len() {
        bail!("no endpoint answered");
    }
    Ok(())
}

pub(crate) async fn map(cmd: MapCmd, conn: &Conn) -> Result<()> {
    // Check the arguments before touching the network.
    match &cmd {
        MapCmd::Put { key, value, .. } => {
            parse_hex("key", key)?;
            parse_hex("value", value)?;
        }
        MapCmd::Get { key, .. } | MapCmd::Delete { key, .. } => {
            parse_hex("key", key)?;
        }
        _ => {}
    }
    let c = conn.client().await?;
    match cmd {
        MapCmd::Declare {
            name,
            map_type,
            key_size,
            value_size,
            max_entries,
        } => {
            let schema = MapSchema {
                name,
                map_type,
                key_size,
                value_size,
                max_entries,
            };
            let r = c.declare(&schema).await?;
            print(conn.output, json!({"index": r.index}), || {
                format!("declared {schema} at index {}", r.index)
            });
        }
        MapCmd::List => {
            let r = c
                .kv()
                .list_maps(pb::ListMapsRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            let j: Vec<_> = r
                .maps
                .iter()
                .filter_map(|m| m.schema.as_ref().map(|s| (s, m.entries)))
                .map(|(s, n)| {
                    json!({"name": s.name, "type": type_name(s.r#type), "key_size": s.key_size,
                    "value_size": s.value_size, "max_entries": s.max_entries, "entries": n})
                })
                .collect();
            print(conn.output, json!(j), || {
                let mut out = format!(
                    "{:<24} {:<9} {:>8} {:>10} {:>11} {:>9}\n",
                    "NAME", "TYPE", "KEY", "VALUE", "MAX", "ENTRIES"
                );
                for m in &r.maps {
                    if let Some(s) = &m.schema {
                        out.push_str(&format!(
                            "{:<24} {:<9} {:>8} {:>10} {:>11} {:>9}\n",
                            s.name,
                            type_name(s.r#type),
                            s.key_size,
                            s.value_size,
                            s.max_entries,
                            m.entries
                        ));
                    }
                }
                out.trim_end().to_string()
            });
        }
        MapCmd::Put { map, key, value } => {
            let r = c
                .put(&map, parse_hex("key", &key)?, parse_hex("value", &value)?)
                .await?;
            print(conn.output, json!({"index": r.index}), || {
                format!("OK (index {})", r.index)
            });
        }
        MapCmd::Get { map, key, local } => {
            match c.get(&map, parse_hex("key", &key)?, !local).await? {
                Some(v) => print(
                    conn.output,
                    json!({"key": key, "value": hex::encode(&v)}),
                    || hex::encode(&v),
                ),
                None => bail!("key {key} not found in map {map}"),
            }
        }
        MapCmd::Delete { map, key } => {
            let r = c.delete(&map, parse_hex("key", &key)?).await?;
            print(conn.output, json!({"index": r.index}), || {
                format!("OK (index {})", r.index)
            });
        }
        MapCmd::Dump { map, local } => {
            let (_, index, entries) = c.dump(&map, !local).await?;
            let j: Vec<_> = entries
                .iter()
                .map(|(k, v)| json!({"key": hex::encode(k), "value": hex::encode(v)}))
                .collect();
            print(conn.output, json!({"index": index, "entries": j}), || {
                let mut out = String::new();
                for (k, v) in &entries {
                    out.push_str(&format!("{} {}\n", hex::encode(k), hex::encode(v)));
                }
                out.push_str(&format!("# {} entries at index {index}", entries.len()));
                out
            });
        }
        MapCmd::Drop { map } => {
            let r = c
                .admin()
                .drop_map(pb::DropMapRequest { map: map.clone() })
                .await
                .map_err(from_status)?
                .into_inner();
            print(conn.output, json!({"map": map, "index": r.index}), || {
                format!("dropped map {map} at index {}", r.index)
            });
        }
    }
    Ok(())
}

fn type_name(t: i32) -> &'static str {
    match pb::MapType::try_from(t) {
        Ok(pb::MapType::Hash) => "hash",
        Ok(pb::MapType::LruHash) => "lru_hash",
        Ok(pb::MapType::Array) => "array",
        _ => "unknown",
    }
}
