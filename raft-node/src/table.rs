//! `raftmap status` as a table people read: one row per node, then its watched maps.

use raftmap_node::proto as pb;

/// Rows aligned in columns (two spaces apart, as kubectl's tables).
pub fn columns<R, C>(rows: R) -> String
where
    R: IntoIterator<Item = C>,
    C: IntoIterator<Item = String>,
{
    use std::io::Write;
    let mut tw = tabwriter::TabWriter::new(Vec::new()).padding(2);
    for row in rows {
        let cells: Vec<String> = row.into_iter().collect();
        // Writing into memory does not fail.
        let _ = writeln!(tw, "{}", cells.join("\t"));
    }
    let bytes = tw.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The `raftmap status` table.
pub fn status_table(rows: &[(String, std::result::Result<pb::StatusResponse, String>)]) -> String {
    let mut nodes = vec![header(&[
        "ENDPOINT", "ID", "ROLE", "LEADER", "TERM", "LAST LOG", "COMMIT", "APPLIED", "SNAPSHOT",
        "READY",
    ])];
    for (ep, r) in rows {
        nodes.push(match r {
            Ok(st) => vec![
                ep.clone(),
                st.node_id.to_string(),
                st.role.clone(),
                if st.has_leader {
                    st.leader_id.to_string()
                } else {
                    "-".into()
                },
                st.term.to_string(),
                st.last_log_index.to_string(),
                st.committed_index.to_string(),
                st.applied_index.to_string(),
                st.snapshot_index.to_string(),
                st.ready.to_string(),
            ],
            Err(e) => vec![ep.clone(), format!("error: {e}")],
        });
    }
    let mut s = columns(nodes);
    s.push('\n');
    for (_, st) in rows
        .iter()
        .filter_map(|(ep, r)| Some((ep, r.as_ref().ok()?)))
    {
        if !st.not_ready_reason.is_empty() {
            s.push_str(&format!(
                "node {} not ready: {}\n",
                st.node_id, st.not_ready_reason
            ));
        }
        if !st.corrupt.is_empty() {
            s.push_str(&format!("node {} CORRUPT: {}\n", st.node_id, st.corrupt));
        }
    }
    let answered: Vec<&pb::StatusResponse> =
        rows.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    if !answered.is_empty() {
        let mut tls = vec![header(&[
            "NODE",
            "TLS IDENTITY",
            "CERT EXPIRES",
            "CA EXPIRES",
        ])];
        for st in answered {
            tls.push(match &st.tls {
                Some(t) => vec![
                    st.node_id.to_string(),
                    t.identity.clone(),
                    expiry(t.expires_unix),
                    expiry(t.ca_expires_unix),
                ],
                None => vec![
                    st.node_id.to_string(),
                    "none: plaintext, unauthenticated (--insecure or loopback)".into(),
                ],
            });
        }
        s.push('\n');
        s.push_str(&columns(tls));
        s.push('\n');
    }
    let watched: Vec<(u64, &pb::WatchedMap)> = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|st| st.watched.iter().map(move |w| (st.node_id, w)))
        .collect();
    if !watched.is_empty() {
        let mut maps = vec![header(&[
            "NODE", "MAP", "BACKEND", "ENTRIES", "LOCATION", "STATE",
        ])];
        let mut refusals = String::new();
        for (node, w) in watched {
            maps.push(vec![
                node.to_string(),
                w.map.clone(),
                w.backend.clone(),
                w.entries.to_string(),
                w.location.clone(),
                w.state.clone(),
            ]);
            if w.refused_changes > 0 {
                refusals.push_str(&format!(
                    "node {node} map {}: {} local changes refused by the cluster and undone; the last: {}\n",
                    w.map, w.refused_changes, w.last_refusal
                ));
            }
        }
        s.push('\n');
        s.push_str(&columns(maps));
        s.push('\n');
        s.push_str(&refusals);
    }
    s.trim_end().to_string()
}

/// An expiry time as a date and the days left.
fn expiry(unix: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let date = time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| unix.to_string());
    let days = (unix - now) / 86_400;
    if unix < now {
        format!("{date} (EXPIRED)")
    } else {
        format!("{date} ({days}d)")
    }
}
